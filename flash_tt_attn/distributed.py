"""Triangle attention with the rows i split over the ranks of a process group.

Rows i of triangle attention are independent: row i reads only q, k, v (and the mask)
of row i, plus the bias, which every row shares. So each rank of a group can hold a
contiguous block of rows and compute its part of the output with no communication.
The only coupling is the bias gradient, a sum over all rows: the backward all-reduces
it (one B·H·L² sum per call), so every rank ends with the full bias gradient.

Example (run with ``torchrun --nproc-per-node 2 example.py``)::

    import torch, torch.distributed as dist
    from flash_tt_attn.distributed import attention, row_block

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    B, H, L, D = 1, 4, 256, 32
    rows = row_block(L)                                  # this rank's slice of rows i
    g = torch.Generator("cuda").manual_seed(0)           # same full tensors on every rank
    q, k, v = (torch.randn(B, H, L, L, D, device="cuda", generator=g)[:, :, rows] for _ in range(3))
    bias = torch.randn(B, H, L, L, device="cuda", generator=g, requires_grad=True)
    o = attention(q, k, v, bias)                         # (B, H, rows, L, D)
    o.sum().backward()                                   # bias.grad: the full gradient, on every rank
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .api import SUPPORTED_DTYPES, check_inputs, run_attention

__all__ = ["attention", "row_block"]

_NAME = "flash_tt_attn.distributed.attention()"
_DTYPE_CODES = {dt: n for n, dt in enumerate(SUPPORTED_DTYPES, start=1)}
_MAX_MESSAGE_BYTES = 2048


def row_block(L: int, group: Optional[dist.ProcessGroup] = None, *, rank: Optional[int] = None,
              world_size: Optional[int] = None) -> slice:
    """The contiguous rows i that ``rank`` of ``group`` holds when L rows are split evenly.

    The first ``L % world_size`` ranks get one row more (the split of ``torch.tensor_split``),
    so blocks differ by at most one row; with more ranks than rows the last ranks get none.
    ``rank`` and ``world_size`` default to those of ``group`` (the default group).

    >>> [row_block(7, rank=r, world_size=3) for r in range(3)]
    [slice(0, 3, None), slice(3, 5, None), slice(5, 7, None)]
    """
    if rank is None:
        rank = dist.get_rank(group)
    if world_size is None:
        world_size = dist.get_world_size(group)
    if not 0 <= rank < world_size:
        raise ValueError(f"row_block(): rank {rank} is not in [0, {world_size})")
    base, extra = divmod(int(L), world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _local_attention(q, k, v, bias, mask, scale):
    """This rank's rows, on the same paths as flash_tt_attn.attention()."""
    return run_attention(q, k, v, bias, scale, mask)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, bias, group):
        ctx.group = group
        return bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad):
        # Sum in at least fp32 (each rank's part arrives in bias's dtype, as the local backward gives it),
        # into a fresh contiguous buffer: autograd's incoming gradient must not be changed in place.
        total = torch.empty(grad.shape, dtype=torch.promote_types(grad.dtype, torch.float32), device=grad.device)
        total.copy_(grad)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total.to(grad.dtype), None


def _check_local(q, k, v, bias, scale, mask) -> None:
    """The checks of flash_tt_attn.attention(), for a block of R ≤ L rows."""
    check_inputs(q, k, v, bias, scale, mask, caller=_NAME, row_block=True)


def _collective_device(group, q) -> torch.device:
    """A device the group's backend can all-gather on: the GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        if isinstance(q, torch.Tensor) and q.device.type == "cuda":
            return q.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).cpu()


class _RankInputs(NamedTuple):
    """What each rank tells the others about its call, gathered as one float64 vector per rank."""

    valid: float  # 1 when this rank's own inputs passed their checks
    B: float
    H: float
    L_local: float
    L: float
    D: float
    dtype_code: float
    has_mask: float
    bias_needs_grad: float
    scale: float


def _check_group(q, k, v, bias, scale, mask, group, sync_bias_grad) -> None:
    """Check this rank's inputs and that all ranks agree, raising the same error on every rank.

    One all-gather of a few numbers per call (and a second one, of the messages, only when a
    rank's own inputs are invalid): a rank never raises while the others wait in a collective.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        _check_local(q, k, v, bias, scale, mask)
        if q.device.type == "cpu" and dist.get_backend(group) == "nccl":
            raise ValueError(f"{_NAME}: the group's backend is NCCL but the inputs are on the CPU; use a gloo "
                             "group for CPU tensors")
        local_error = None
    except (TypeError, ValueError) as err:
        local_error = err
    device = _collective_device(group, q)

    if local_error is None:
        B, H, R, L, D = q.shape
        s = 1.0 / math.sqrt(D) if scale is None else float(scale)
        meta = _RankInputs(1, B, H, R, L, D, _DTYPE_CODES[q.dtype], mask is not None, sync_bias_grad, s)
    else:
        meta = _RankInputs(*([0] * len(_RankInputs._fields)))
    gathered = _all_gather(torch.tensor(meta, dtype=torch.float64, device=device), group).tolist()
    metas = [_RankInputs(*m) for m in gathered]

    bad = [r for r, m in enumerate(metas) if m.valid == 0]
    if bad:
        text = "" if local_error is None else str(local_error).removeprefix(f"{_NAME}: ")
        message = text.encode()[:_MAX_MESSAGE_BYTES]
        buf = torch.zeros(_MAX_MESSAGE_BYTES, dtype=torch.uint8)
        buf[:len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8) if message else buf[:0]
        texts = [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")
                 for row in _all_gather(buf.to(device), group)]
        first = bad[0]
        raise ValueError(f"{_NAME}: invalid inputs on rank {first} of {world} (ranks with invalid inputs: "
                         f"{bad}): {texts[first]}") from local_error

    def differ(*fields):
        return any(getattr(m, f) != getattr(metas[0], f) for m in metas for f in fields)

    def table(fields):
        return "; ".join(f"rank {r}: " + ", ".join(f"{f}={int(getattr(m, f))}" for f in fields)
                         for r, m in enumerate(metas))

    problems = []
    L_locals = [int(m.L_local) for m in metas]
    if differ("B", "H", "L", "D"):
        problems.append("B, H, L and D must be the same on every rank (" +
                        table(("B", "H", "L_local", "L", "D")) + ")")
    elif sum(L_locals) != int(metas[0].L):
        problems.append(f"the ranks' blocks of rows must add up to L = {int(metas[0].L)}, got L_local = "
                        f"{L_locals} (sum {sum(L_locals)})")
    if differ("dtype_code"):
        names = {c: str(dt).replace("torch.", "") for dt, c in _DTYPE_CODES.items()}
        problems.append("the dtype must be the same on every rank (" +
                        ", ".join(f"rank {r}: {names[int(m.dtype_code)]}" for r, m in enumerate(metas)) + ")")
    if differ("has_mask"):
        problems.append("mask must be given on every rank or on none (given on ranks "
                        f"{[r for r, m in enumerate(metas) if m.has_mask]})")
    if differ("bias_needs_grad"):
        problems.append("bias must require grad (with grad mode on) on every rank or on none: the backward "
                        f"all-reduces its gradient (it does on ranks "
                        f"{[r for r, m in enumerate(metas) if m.bias_needs_grad]})")
    if differ("scale"):
        problems.append("scale must be the same on every rank (" +
                        ", ".join(f"rank {r}: {m.scale!r}" for r, m in enumerate(metas)) + ")")
    if problems:
        raise ValueError(f"{_NAME}: the {world} ranks' inputs do not fit together (this is rank {rank}): " +
                         "; ".join(problems))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Triangle attention with the rows i split over the ranks of ``group``.

    Rank r holds a contiguous block of rows i (rank 0 the first rows, then rank 1's, and so
    on; :func:`row_block` gives an even split) and computes, for its rows::

        o[b,h,i,j] = Σ_k softmax_k(scale · q[b,h,i,j]·k[b,h,i,k] + bias[b,h,j,k]) · v[b,h,i,k]

    which equals the same rows of :func:`flash_tt_attn.attention` on the whole tensors.

    Args:
        q, k, v: (B, H, L_local, L, D), this rank's rows i; L_local may differ between ranks
            (by any amount, also 0) as long as the blocks add up to L.
        bias: (B, H, L, L), the whole bias, the same on every rank (replicated; not checked).
        scale: multiplies q·k; defaults to 1/sqrt(D); the same on every rank.
        mask: optional bool (B, L_local, L), this rank's rows; True = this key takes part.
        group: the process group the rows are split over (default: the default group).
        check: all-gather every rank's shapes, dtype, mask, scale and whether the bias needs
            a gradient, and raise the same ``ValueError`` on every rank when they do not fit
            together (or when one rank's inputs are invalid) instead of hanging in the
            backward's all-reduce. One small collective per call, which on GPUs also waits
            for the host; pass ``check=False`` in a training loop whose shapes were checked.

    Returns:
        (B, H, L_local, L, D) tensor with q's dtype: this rank's rows of the output.

    Communication: the forward none (besides ``check``); the backward one all-reduce (sum)
    of the bias gradient, B·H·L² values, in fp32 (fp64 for float64), when the bias requires
    grad. Gradients of q, k and v stay local to their rows.

    The bias gradient on every rank is the **global** sum over all rows of all ranks, so
    ``bias.grad`` is already the full gradient, the same on every rank: do not all-reduce or
    average it (or gradients computed only from it, such as those of a replicated bias
    projection) again over ``group``, e.g. with DistributedDataParallel over the same ranks.
    Gradients reaching parameters through q, k, v are partial (this rank's rows) and do need
    a sum over ``group``. Every rank must run the backward through its output (the
    all-reduce is a collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_NAME}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group() first, or use flash_tt_attn.attention() "
                           "in one process")
    sync_bias_grad = isinstance(bias, torch.Tensor) and bias.requires_grad and torch.is_grad_enabled()
    if check:
        _check_group(q, k, v, bias, scale, mask, group, sync_bias_grad)
    else:
        _check_local(q, k, v, bias, scale, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if sync_bias_grad:
        bias = _SumGradOverGroup.apply(bias, group)
    return _local_attention(q, k, v, bias, mask, scale)
