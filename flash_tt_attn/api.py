"""The public function :func:`attention`: validates its arguments, then picks a path."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import reference
from ._compat import env_flag
from .errors import out_of_memory

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

__all__ = ["attention", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_inputs(q, k, v, bias, scale, mask, *, caller: str = "attention()", row_block: bool = False) -> None:
    """Raise a TypeError/ValueError naming the argument and what was expected; return None when valid.

    ``row_block=True`` accepts q, k, v of shape (B, H, R, L, D) with R ≤ L rows i (a shard of the pair
    tensor, as :mod:`flash_tt_attn.distributed` passes) and a mask of shape (B, R, L).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{caller}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    q_layout = "(B, H, L_local, L, D)" if row_block else "(B, H, L, L, D)"
    if q.dim() != 5:
        raise ValueError(f"{caller}: q must have shape {q_layout} (5 dims), got {_shape(q)}")
    B, H, R, L, D = q.shape
    if row_block and R > L:
        raise ValueError(f"{caller}: q must have shape {q_layout} with L_local ≤ L (this rank's block of rows i), "
                         f"got {_shape(q)}")
    if not row_block and R != L:
        raise ValueError(f"{caller}: q must have shape {q_layout} with equal pair dims, got {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{caller}: {name} must have q's shape {_shape(q)}, got {_shape(t)}")
    if bias.shape != (B, H, L, L):
        whole = " (the whole bias, on every rank)" if row_block else ""
        raise ValueError(f"{caller}: bias must have shape (B, H, L, L) = ({B}, {H}, {L}, {L}){whole}, "
                         f"got {_shape(bias)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{caller}: mask must be a bool tensor (True = key takes part), got {mask.dtype}")
        if mask.shape != (B, R, L):
            mask_layout = "(B, L_local, L)" if row_block else "(B, L, L)"
            raise ValueError(f"{caller}: mask must have shape {mask_layout} = ({B}, {R}, {L}), got {_shape(mask)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{caller}: {name} has dtype {t.dtype}; expected one of {names}")
    for name, t in (("k", k), ("v", v), ("bias", bias)):
        if t.dtype != q.dtype:
            raise TypeError(f"{caller}: {name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v, bias "
                            "must share one dtype")
    for name, t in (("k", k), ("v", v), ("bias", bias), ("mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{caller}: {name} is on {t.device} but q is on {q.device}; all inputs must be on "
                             "one device")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{caller}: head dim D = {D} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{caller}: scale must be a real number or None, got {type(scale).__name__}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{caller}: device {q.device} is not supported (CUDA runs the Triton kernels, "
                         "CPU the interpreter or the PyTorch reference)")


def check_lengths(lengths, batch_shape, L: int, device: torch.device, *, caller: str = "attention()",
                  layout: str = "(B,)") -> None:
    """Raise a TypeError/ValueError when ``lengths`` is not an integer tensor of shape ``batch_shape``
    with values in [0, L], on ``device`` or on the CPU; return None when valid. Reads the values: one host
    sync when they are on a GPU, none on the CPU."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{caller}: lengths must be a torch.Tensor or None, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{caller}: lengths must be an integer tensor (residues per sequence), got {lengths.dtype}")
    if tuple(lengths.shape) != tuple(batch_shape):
        want = ", ".join(str(s) for s in batch_shape) + ("," if len(batch_shape) == 1 else "")
        raise ValueError(f"{caller}: lengths must have shape {layout} = ({want}), got {_shape(lengths)}")
    if lengths.device != device and lengths.device.type != "cpu":
        raise ValueError(f"{caller}: lengths is on {lengths.device} but the inputs are on {device}; lengths must "
                         "be on the inputs' device or on the CPU")
    # Reading the values syncs with a GPU, and torch.compile cannot branch on them: there padded_extents'
    # clamp to [0, L] stands in for the check.
    if lengths.numel() and not torch.compiler.is_compiling() and bool(((lengths < 0) | (lengths > L)).any()):
        raise ValueError(f"{caller}: lengths must lie in [0, L] = [0, {L}], got {lengths.tolist()}")


def padded_extents(lengths: torch.Tensor, L: int, first_row: int = 0, rows: Optional[int] = None) -> torch.Tensor:
    """The kernels' form of a padded tail: a (B, 2) int32 tensor holding, per batch item, how many of the
    rows ``first_row, first_row + 1, ...`` (``rows`` of them; ``L - first_row`` when None) are real residues,
    and how many of the L columns (keys and queries) are: ``lengths[b]``. Computed on lengths' device
    without a host sync, and clamped to [0, L], so the kernels never index past the tensors whatever the
    values (:func:`check_lengths` rejects values outside [0, L] first, except under torch.compile)."""
    n = lengths.to(torch.int32).clamp(0, L)
    real_rows = (n - first_row).clamp(0, L - first_row if rows is None else rows)
    return torch.stack((real_rows, n), dim=1).contiguous()


def extents_mask(extents: torch.Tensor, R: int, L: int) -> torch.Tensor:
    """The bool (B, R, L) mask of :func:`padded_extents`: row r and column k both real. It is the key mask of
    a padded tail and, read over queries j instead of keys, the mask of its real (row, query) pairs."""
    real_rows = torch.arange(R, device=extents.device) < extents[:, :1]  # (B, R)
    real_cols = torch.arange(L, device=extents.device) < extents[:, 1:]  # (B, L)
    return real_rows[:, :, None] & real_cols[:, None, :]


def lengths_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """The bool (B, L, L) pair mask of a padded tail: ``mask[b, i, k] = i < lengths[b] and k < lengths[b]``."""
    return extents_mask(padded_extents(lengths, L), L, L)


def _uses_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Which path a call takes: the Triton kernels, or reference.attention_chunked.

    float64 on CUDA takes the reference path: Triton 3.6 fails to compile the fp64 kernels with a
    mask ("fp64 don't support largeK MMA"), and fp64 is for gradient checks, not speed. CPU tensors
    run the kernels only when TRITON_INTERPRET=1 is set now and was set when the kernels were
    imported (Triton fixes the mode then); otherwise the reference, without importing triton.
    """
    if device.type == "cuda":
        return dtype != torch.float64
    if not env_flag("TRITON_INTERPRET"):
        return False
    try:
        from . import ops  # noqa: PLC0415 (keeps the CPU-only import light)
    except ModuleNotFoundError as error:
        if error.name != "numpy":
            raise
        raise ModuleNotFoundError(
            "TRITON_INTERPRET=1 runs the kernels under Triton's interpreter, which needs numpy, and numpy is not "
            "installed: pip install numpy (a dependency of flash-tt-attn), or unset TRITON_INTERPRET to run the "
            "PyTorch path on CPU", name="numpy") from error

    return ops.KERNELS_INTERPRETED


def _interpreted_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    """True when a call would run bfloat16 kernels under Triton's interpreter.

    The interpreter's ``tl.dot`` multiplies bf16 operands' bit patterns as integers
    (triton-lang/triton#11584), so every output element would come out wrong, silently.
    :func:`run_attention` runs such calls on float32 copies and rounds the output to bfloat16.
    """
    return device.type == "cpu" and dtype == torch.bfloat16 and _uses_triton(device, dtype)


def layer_norm_rows(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` for a pair tensor's rows x (B, R, L, c): the Triton layer norm (:class:`ops.LayerNormRows`)
    where it applies (an eager call the kernels run in 16 or 32 bits: CUDA, or the interpreter in fp32/fp16; the
    kernel's statistics are fp32, so float64 keeps PyTorch's norm; no autocast, which would compute the norm in
    fp32; x's last dim contiguous; an affine norm of x's dtype over that dim), else the module itself. Equal to
    rounding: the statistics are summed in another order."""
    weight, bias = norm.weight, norm.bias
    if (torch.compiler.is_compiling() or x.dtype == torch.float64 or x.dim() != 4 or x.stride(-1) != 1
            or weight is None or bias is None
            or tuple(norm.normalized_shape) != (x.shape[-1],) or weight.dtype != x.dtype or bias.dtype != x.dtype
            or torch.is_autocast_enabled(x.device.type) or not _uses_triton(x.device, x.dtype)
            or _interpreted_bf16(x.device, x.dtype)):
        return norm(x)
    from .ops import LayerNormRows, layer_norm_without_grad  # noqa: PLC0415

    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return LayerNormRows.apply(x, weight, bias, norm.eps)
    return layer_norm_without_grad(x, weight, bias, norm.eps)


def run_attention(q, k, v, bias, scale: float, mask, extents: Optional[torch.Tensor] = None,
                  heads_last: bool = False) -> torch.Tensor:
    """The computation behind :func:`attention` (inputs already checked, scale resolved), also for
    row shards (q of shape (B, H, R, L, D)): picks the path and names the shapes on out-of-memory.
    ``extents`` (:func:`padded_extents`) marks a padded tail: keys past it are left out, and its padded
    (row, query) pairs give 0. ``heads_last`` asks for the output as a permuted view of a contiguous
    (B, R, L, H, D) tensor (ops.launch_forward), which a forward without autograd on the Triton path honours;
    the other paths return their usual layout. The values are the same in either layout."""
    if _interpreted_bf16(q.device, q.dtype):
        # fp32 kernels, a bf16 result; gradients flow back through the casts and come out in bf16.
        out = run_attention(q.float(), k.float(), v.float(), bias.float(), scale, mask, extents)
        return out.to(q.dtype)
    try:
        if _uses_triton(q.device, q.dtype):
            from .ops import DirectAttention, attention_fwd, direct_call_allowed, forward_without_grad  # noqa: PLC0415

            if direct_call_allowed(q, k, v, bias, mask, extents):
                if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                                     or bias.requires_grad)):
                    return forward_without_grad(q, k, v, bias, mask, scale, extents, heads_last)
                out, _ = DirectAttention.apply(q, k, v, bias, mask, scale, extents)
            else:
                out, _ = attention_fwd(q, k, v, bias, mask, scale, extents)
            return out
        if extents is None:
            return reference.attention_chunked(q, k, v, bias, scale=scale, mask=mask)
        real = extents_mask(extents, q.shape[2], q.shape[3])
        out = reference.attention_chunked(q, k, v, bias, scale=scale, mask=real if mask is None else mask & real)
        return out * real[:, None, :, :, None]
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, "forward", q) from error


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triangle attention with a pair bias, fused (FlashAttention-2 style) in Triton.

    For every batch b, head h and row i::

        o[b,h,i,j] = Σ_k softmax_k(scale · q[b,h,i,j]·k[b,h,i,k] + bias[b,h,j,k]) · v[b,h,i,k]

    with keys where ``mask[b,i,k]`` is False left out. This is AlphaFold's triangle
    attention around the *starting* node: the bias is shared by every row i. For the
    *ending* node, call it on the transposed pair tensors and transpose back::

        o = attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), bias, scale,
                      mask.transpose(1, 2)).transpose(2, 3)

    Args:
        q, k, v: (B, H, L, L, D) tensors; D in 16, 32, 64, 128; any L ≥ 1.
        bias: (B, H, L, L), same dtype as q; it receives a gradient.
        scale: multiplies q·k; defaults to 1/sqrt(D).
        mask: optional bool (B, L, L); True = this key takes part. A row whose keys
            are all excluded gives 0 output and 0 gradients.
        lengths: optional integer (B,) tensor, 0 ≤ lengths[b] ≤ L, on q's device or on the
            CPU (no device sync to check it; it is then copied to the device): sequence b has
            lengths[b] residues and a padded tail. Keys k ≥ lengths[b] are left out (and'ed
            with ``mask`` when both are given), and every padded pair (i or j ≥ lengths[b])
            gives 0: the result equals the call with
            ``mask[b, i, k] = i < lengths[b] and k < lengths[b]`` times that same mask read
            over (i, j) (bitwise under the interpreter; on a GPU to rounding, since the
            masked call rescales each row once more per fully masked key block). The
            kernels skip every tile that holds only padding, in the forward and the
            backward, so a padded batch item costs about its real length's work.

    Returns:
        (B, H, L, L, D) tensor with q's dtype.

    dtypes: float16, bfloat16, float32 (full fp32 products, no TF32) and float64 (for
    gradient checks; on CUDA it runs the PyTorch reference path below).
    Gradients flow to q, k, v and bias and are bitwise reproducible.

    Running out of GPU memory raises torch.OutOfMemoryError naming these shapes; the
    process can catch it and go on.

    Paths: CUDA tensors run the Triton kernels. CPU tensors run the same kernels under
    Triton's interpreter when ``TRITON_INTERPRET=1`` is set and was set before
    ``flash_tt_attn.ops`` (the kernels) was first imported;
    otherwise they run :func:`flash_tt_attn.reference.attention_chunked`, pure PyTorch
    in chunks of rows (same results, fp32 math, O(L²) memory per row chunk). bfloat16
    under the interpreter runs the kernels in float32 and rounds the output to bfloat16
    (the interpreter's bf16 ``tl.dot`` is wrong).

    Example::

        >>> import torch
        >>> from flash_tt_attn import attention
        >>> q = torch.randn(1, 2, 8, 8, 16)
        >>> k, v = torch.randn_like(q), torch.randn_like(q)
        >>> bias = torch.randn(1, 2, 8, 8)
        >>> attention(q, k, v, bias, 0.25).shape
        torch.Size([1, 2, 8, 8, 16])
    """
    check_inputs(q, k, v, bias, scale, mask)
    extents = None
    if lengths is not None:
        check_lengths(lengths, q.shape[:1], q.shape[-2], q.device)
        extents = padded_extents(lengths, q.shape[-2]).to(q.device, non_blocking=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return run_attention(q, k, v, bias, scale, mask, extents)
