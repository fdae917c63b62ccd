"""Launchers for the Triton kernels, registered with ``torch.library``.

Two custom ops, ``flash_tt_attn::attention_fwd`` and ``flash_tt_attn::attention_bwd``,
are defined with :func:`torch.library.triton_op` and launch their kernels through
:func:`torch.library.wrap_triton`, so ``torch.compile(fullgraph=True)`` can trace them and
``torch.library.opcheck`` can test them. The forward's autograd formula is registered
with :func:`torch.library.register_autograd`. Plain eager calls skip the custom-op dispatch:
:class:`DirectAttention` calls the same launchers (:func:`launch_forward`, :func:`launch_backward`).

No argument checking happens here: :mod:`flash_tt_attn.api` validates first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import NamedTuple, Optional

import torch
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import tuning
from ._compat import env_flag
from .errors import out_of_memory
from .kernels.backward import (
    attention_bwd_dbias_kernel,
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    sum_row_splits_kernel,
)
from .kernels.forward import attention_fwd_kernel
from .kernels.layer_norm import layer_norm_fwd_kernel
from .launch import FastLauncher
from .tuning import KernelOptions, LaunchConfig

__all__ = ["LaunchConfig", "KernelOptions", "options", "override", "launch_config", "attention_fwd", "attention_bwd",
           "launch_forward", "launch_backward", "DirectAttention", "LayerNormRows",
           "layer_norm_without_grad"]


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``) in the environment now."""
    return env_flag("TRITON_INTERPRET")


# Triton decides at @triton.jit time (the import of the kernels) whether they are interpreted;
# setting TRITON_INTERPRET later does not change that, so the API asks this instead.
KERNELS_INTERPRETED = interpreter_enabled()


_options = KernelOptions()


def options() -> KernelOptions:
    """The switches in force."""
    return _options


@contextlib.contextmanager
def override(**changes):
    """Replace some of :class:`KernelOptions`' fields inside a ``with`` block (``configs`` as a dict
    {kernel: LaunchConfig}); the previous options come back on exit, also on an error."""
    global _options
    if "configs" in changes:
        changes["configs"] = tuple(sorted(dict(changes["configs"]).items()))
    previous = _options
    _options = dataclasses.replace(previous, **changes)
    try:
        yield _options
    finally:
        _options = previous


def launch_config(kernel: str, L: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The config of one launch of ``kernel`` ("forward", "dq", "dkdv", "dbias"): the tuning table's
    (flash_tt_attn/tuning.py), unless :func:`override` forces one."""
    opts = _options
    config = dict(opts.configs).get(kernel)
    if config is None:
        shared_memory = None
        if opts.shared_memory_per_program is not None:
            shared_memory = lambda index: opts.shared_memory_per_program  # noqa: E731
        config = tuning.choose(kernel, L, head_dim, dtype, device, _launch_is_traced(), shared_memory)
    if kernel in ("forward", "dq", "dkdv") and config.rows not in _ROWS[kernel]:
        raise ValueError(f"the {kernel} kernel takes {' or '.join(map(str, _ROWS[kernel]))} rows per program, "
                         f"not {config.rows}")
    return config


_ROWS = {"forward": (1, 2, 4), "dq": (1, 2), "dkdv": (1, 2)}


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 must not silently use TF32: gradient checks need full precision.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _fast_exp2(dtype: torch.dtype, device: torch.device) -> bool:
    return _options.fast_exp2 and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _launch_is_traced() -> bool:
    """True while torch.compile (or make_fx) traces a launch: torch switches wrap_triton off inside the
    custom ops' eager calls and leaves it on while tracing."""
    return is_wrap_triton_enabled()


def _settle(dtype: torch.dtype, device: torch.device, cfg: LaunchConfig) -> bool:
    """Whether dq and dk/dv wait for their accumulating product within each iteration (kernels/common.py)."""
    # An fp32 register identity in inline PTX: GPU only, and only where the accumulators are fp32.
    if not (_options.settle_accumulators and cfg.settle and device.type == "cuda" and dtype != torch.float64):
        return False
    # A traced launch cannot carry the register cap (_launch_options), and settled accumulators fit three
    # programs per SM only under it: there the serialized form (148 registers uncapped) is 9-11% faster
    # at the small targets, with the same bits.
    return cfg.max_registers is None or not _launch_is_traced()


def _dbias_unscaled_scores(scale: float) -> bool:
    return _options.dbias_unscaled_scores and scale != 0.0


def _q_prescaled(dtype: torch.dtype, scale: float) -> bool:
    """Whether the kernels may scale q in its own dtype: not for fp16 with |scale| > 1 (q·scale could overflow)."""
    return not (dtype == torch.float16 and abs(scale) > 1.0)


def _prescaled(common: dict, cfg: LaunchConfig) -> dict:
    """The backward's constants (backward_constants) for a dq or dk/dv launch under cfg: its operand is
    prescaled only where the dtype and scale allow it and cfg asks for it."""
    return dict(common, Q_PRESCALED=common["Q_PRESCALED"] and cfg.prescale)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _even(L: int, cfg: LaunchConfig, has_extents: bool) -> bool:
    """L is a multiple of both tile sizes and no padded tail ends inside a tile: the kernels can drop their
    bounds masks."""
    return L % cfg.block_j == 0 and L % cfg.block_k == 0 and not has_extents


def _tile_args(L: int, cfg: LaunchConfig, common: tuple) -> dict:
    """The tile constants of a backward launch, whose ``common`` constants (backward_constants) say whether
    a padded tail is given."""
    return dict(EVEN_L=_even(L, cfg, dict(common)["HAS_EXTENTS"]), BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k)


def _launch_options(cfg: LaunchConfig) -> dict:
    options = dict(LOOP_STAGES=cfg.loop_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # While torch.compile (or make_fx) traces the launches, wrap_triton forwards num_warps and num_stages
    # but not maxnreg: a compiled graph runs without the register cap (and _settle then picks the
    # serialized form of a capped config, which needs no cap).
    if cfg.max_registers is not None and _options.register_caps and not _launch_is_traced():
        options["maxnreg"] = cfg.max_registers
    return options


def row_offset_dtype(L: int, head_dim: int, *strides: tuple):
    """Integer type of the offsets inside one row i's (L, D) slice of tensors with these strides: int32 when
    every such offset fits (fewer address instructions in the kernels' main loops), int64 otherwise."""
    if _options.row_offset_dtype is not None:
        return _options.row_offset_dtype
    span = max((L - 1) * abs(s[3]) + (head_dim - 1) * abs(s[4]) for s in strides)
    return tl.int32 if span < 2**31 else tl.int64


_LAUNCHERS = {kernel: FastLauncher(kernel) for kernel in (
    attention_fwd_kernel, attention_bwd_dq_kernel, attention_bwd_dkdv_kernel, attention_bwd_dbias_kernel,
    sum_row_splits_kernel, layer_norm_fwd_kernel)}


def _launch(kernel, plan: LaunchPlan, tensors: tuple) -> None:
    """``kernel[grid](*tensors, *scalars, **constants)`` for the plan's grid, scalars and constants: through
    wrap_triton while torch.compile traces the launch, otherwise through the kernel's launch cache
    (flash_tt_attn/launch.py), which skips Triton's per-launch binding of arguments it has already seen."""
    if _launch_is_traced():
        wrap_triton(kernel)[plan.grid](*tensors, *plan.scalars, **plan.constants)
    else:
        _LAUNCHERS[kernel].launch(plan.grid, tensors, plan.scalars, plan.constants, plan.key)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    """The mask as bytes with its strides, or a dummy pointer with zero strides.

    A copy (B·L² bytes, small beside q), not a bool->uint8 view: Inductor cannot lower that view.
    """
    if mask is None:
        return like, (0, 0, 0), False
    as_bytes = mask.to(torch.uint8)
    return as_bytes, tuple(as_bytes.stride()), True


def _extents_args(extents: Optional[torch.Tensor], like: torch.Tensor):
    """The (B, 2) int32 counts of real rows and real columns (a padded tail; api.padded_extents), or a dummy
    pointer."""
    if extents is None:
        return like, False
    return extents, True


SUM_BLOCK = 1024  # elements per program of the split reduction


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0. Not triton.cdiv, a Triton constexpr_function that costs the host about 2 µs a call;
    the launchers call this a dozen times per backward."""
    return -(-a // b)


def dbias_splits(B: int, H: int, R: int, L: int, head_dim: int, cfg: LaunchConfig) -> int:
    """How many chunks of the R rows i the bias gradient is summed over in parallel.

    Enough programs to fill a large GPU (about 1024), and never more than head_dim / 2
    chunks, so the fp32 partial sums take no more memory than q does in 16 bits.
    Depends only on shapes, so the reduction order (and the result) is reproducible.
    """
    tiles = B * H * cdiv(L, cfg.block_j) * cdiv(L, cfg.block_k)
    wanted = cdiv(1024, tiles)
    return max(1, min(wanted, head_dim // 2, R))


def _contiguous_strides(shape) -> tuple:
    """The strides torch gives a new contiguous tensor of this shape (outputs, gradients, lse)."""
    return torch.empty(shape, device="meta").stride()


class LaunchPlan(NamedTuple):
    """One kernel launch with everything but its tensors: ``kernel[grid](*tensors, *scalars, **constants)``.
    ``key`` identifies this plan's scalars and constants for the launch cache; no other plan has it."""

    grid: tuple
    scalars: tuple
    constants: dict
    key: int


_PLAN_KEYS = itertools.count()


def _launch_plan(grid: tuple, scalars: tuple, constants: dict) -> LaunchPlan:
    return LaunchPlan(grid, scalars, constants, next(_PLAN_KEYS))


class BiasGradientPlan(NamedTuple):
    """The bias gradient: its kernel's launch into ``partial`` (one slice per split of the rows i), and the
    fixed-order sum over the splits when there are several (``split_sum``, else None; None too when the dk/dv
    kernel sums them, KernelOptions.fold_split_sum)."""

    partial_shape: tuple
    partial_dtype: torch.dtype
    kernel: LaunchPlan
    split_sum: Optional[LaunchPlan]

    @property
    def splits(self) -> int:
        return self.partial_shape[0]


class KeyValueGradientPlan(NamedTuple):
    """dk and dv: whether the kernel reads a key-major copy of the bias, and its launch."""

    key_major_bias: bool
    kernel: LaunchPlan
    bias_width: int  # L, or the width of the zero-padded copy it reads (KernelOptions.pad_bias_tiles_backward)
    sums_dbias_splits: bool  # it also sums the bias gradient's row splits (KernelOptions.fold_split_sum)
    #: the strides of the key-major copy the dq kernel writes for it (KernelOptions.fold_bias_copy), or None:
    #: launch_backward then makes the copy itself where key_major_bias asks for one
    bias_copy_strides: Optional[tuple]


_PLANS: dict = {}


def _plan(build, *signature):
    """``build(*signature)``, the launch's grid, scalar arguments and constants, computed once per signature
    (shapes, strides, dtype, device, scale, mask layout) and :class:`KernelOptions` on the eager path. While
    torch.compile traces a launch the shapes may be symbolic, so the plan is built afresh and not kept."""
    if _launch_is_traced():
        return build(*signature)
    key = (build, _options, signature)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4096:  # shapes that keep changing: start over rather than grow without bound
            _PLANS.clear()
        plan = _PLANS[key] = build(*signature)
    return plan


def _forward_plan(shape, q_s, k_s, v_s, out_s, bias_s, mask_s, has_mask, has_extents, dtype, device, scale):
    B, H, R, L, D = shape
    cfg = launch_config("forward", L, D, dtype, device)
    grid = (cdiv(L, cfg.block_j), cdiv(R, cfg.rows), B * H)
    scalars = (*q_s, *k_s, *v_s, *out_s, *bias_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), H, R, L, scale)
    constants = dict(
        # The forward keeps its unmasked loads with a padded tail (its scores drop the tail: kernels/forward.py).
        HAS_MASK=has_mask, HAS_EXTENTS=has_extents, EVEN_L=_even(L, cfg, False),
        Q_PRESCALED=_q_prescaled(dtype, scale) and cfg.prescale,
        ROWS=cfg.rows, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k, HEAD_DIM=D,
        ACC_DTYPE=_acc_dtype(dtype), DOT_PRECISION=_dot_precision(dtype),
        FAST_EXP2=_fast_exp2(dtype, device), ROW_OFFSET_DTYPE=row_offset_dtype(L, D, k_s, v_s),
        END_TILE_SELECT=_options.end_tile_select,
        BIAS_PADDED=_options.pad_bias_tiles and _padded_bias_width(L, cfg) != L, **_launch_options(cfg))
    return _launch_plan(grid, scalars, constants)


def launch_forward(q, k, v, bias, mask, scale: float, extents=None,
                   heads_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's launch, behind both :func:`attention_fwd` and :class:`DirectAttention`:
    returns the output (q's dtype) and the base-2 log-sum-exp (B, H, R, L), fp32.

    q, k, v: (B, H, R, L, D) hold R rows i (R = L for the whole pair tensor, fewer for a
    shard of rows); bias (B, H, L, L); mask (B, R, L) or None; extents (B, 2) int32 or None: per batch
    item the real rows among these R and the real columns of L (a padded tail, api.padded_extents).
    heads_last: the output (B, H, R, L, D) is a permuted view of a contiguous (B, R, L, H, D) tensor (the
    layout in which a block gates it and projects its H·D channels) rather than contiguous itself; the same
    values either way (the kernel stores through the output's strides).
    """
    B, H, R, L, D = q.shape
    if heads_last:
        out = q.new_empty((B, R, L, H, D)).permute(0, 3, 1, 2, 4)
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, R, L), dtype=_lse_dtype(q.dtype), device=q.device)
    if q.numel() == 0:  # no rows (an empty shard), no pairs or no batch: nothing to launch
        return out, lse
    mask_t, mask_strides, has_mask = _mask_args(mask, q)
    extents_t, has_extents = _extents_args(extents, q)
    if _options.pad_bias_tiles:
        bias = _pad_bias(bias, _padded_bias_width(L, launch_config("forward", L, D, q.dtype, q.device)))
    plan = _plan(_forward_plan, q.shape, q.stride(), k.stride(), v.stride(), out.stride(), bias.stride(), mask_strides,
                 has_mask, has_extents, q.dtype, q.device, scale)
    _launch(attention_fwd_kernel, plan, (q, k, v, bias, mask_t, extents_t, out, lse))
    return out, lse


def _backward_bias_width(L: int, cfg: LaunchConfig) -> int:
    """The bias width dq or dk/dv reads: with KernelOptions.pad_bias_tiles_backward where the tiles do not
    divide L, a zero-padded copy of whole tiles (as the forward's, :func:`_padded_bias_width`); else L."""
    return _padded_bias_width(L, cfg) if _options.pad_bias_tiles_backward else L


def _pad_bias(bias: torch.Tensor, width: int) -> torch.Tensor:
    """bias (B, H, L, L) with zeros appended to ``width`` rows and columns, contiguous; bias itself when width
    is L. Contiguous on purpose: the backward plans assume it (the forward's plan reads the copy's strides), and
    F.pad keeps a channels-last input channels-last, as a bias permuted from (B, L, L, H) is."""
    L = bias.shape[-1]
    if width == L:
        return bias
    return torch.nn.functional.pad(bias, (0, width - L, 0, width - L)).contiguous()


def _padded_bias_width(L: int, cfg: LaunchConfig) -> int:
    """With KernelOptions.pad_bias_tiles, the forward's bias is padded with zeros to this many rows and columns
    (L rounded up to whole tiles; L itself where the tiles divide L), so that its tiles load unmasked."""
    tile = max(cfg.block_j, cfg.block_k)
    return L if _even(L, cfg, False) else -(-L // tile) * tile


@triton_op("flash_tt_attn::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    mask: Optional[torch.Tensor], scale: float, extents: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward as a custom op (:func:`launch_forward`): the output and the base-2 log-sum-exp, fp32."""
    return launch_forward(q, k, v, bias, mask, scale, extents)


def _dq_plan(shape, q_s, k_s, v_s, out_s, dout_s, bias_s, mask_s, dtype, device, scale, common, dkdv):
    """dq's launch; it also writes dk/dv's key-major copy of the bias when ``dkdv`` (its plan) says so."""
    B, H, R, L, D = shape
    cfg = launch_config("dq", L, D, dtype, device)
    grid = (cdiv(L, cfg.block_j), cdiv(R, cfg.rows), B * H)
    width = _backward_bias_width(L, cfg)
    if width != L:  # the zero-padded copy launch_backward makes (contiguous)
        bias_s = _contiguous_strides((B, H, width, width))
    copy_s = dkdv.bias_copy_strides or (0, 0, 0, 0)  # _dkdv_plan folds the copy only where its width is dq's
    scalars = (*q_s, *_contiguous_strides(shape), *k_s, *v_s, *out_s, *dout_s, *bias_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), *copy_s, H, R, L, scale,
               width if dkdv.bias_copy_strides is not None else 0)
    constants = dict(ROWS=cfg.rows, ROW_OFFSET_DTYPE=row_offset_dtype(L, D, k_s, v_s),
                     SETTLE=_settle(dtype, device, cfg), **_prescaled(dict(common), cfg), **_tile_args(L, cfg, common),
                     BIAS_PADDED=width != L, COPY_BIAS=dkdv.bias_copy_strides is not None, **_launch_options(cfg))
    return _launch_plan(grid, scalars, constants)


def _dbias_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common):
    """The bias-gradient kernel's launch, and the split sum's when the R rows are split (``sum`` is None
    otherwise): the kernel sums ``rows_per_split`` rows i into each of ``splits`` partial gradients."""
    B, H, R, L, D = shape
    cfg = launch_config("dbias", L, D, dtype, device)
    forced = _options.dbias_splits
    rows_per_split = cdiv(R, forced if forced is not None else dbias_splits(B, H, R, L, D, cfg))
    splits = cdiv(R, rows_per_split)
    # One split: the kernel writes the gradient in bias's dtype directly (no fp32 buffer, no cast).
    partial_dtype = dtype if splits == 1 else _lse_dtype(dtype)
    partial_shape = (splits, B, H, L, L)
    grid = (cdiv(L, cfg.block_j) * cdiv(L, cfg.block_k), splits, B * H)
    scalars = (*q_s, *k_s, *v_s, *dout_s, *bias_s, *mask_s, *_contiguous_strides((B, H, R, L)),
               *_contiguous_strides(partial_shape), H, R, L, rows_per_split, scale)
    constants = dict(UNSCALED_SCORES=_dbias_unscaled_scores(scale), **dict(common), **_tile_args(L, cfg, common),
                     **_launch_options(cfg))
    split_sum = None
    if splits > 1 and not _options.fold_split_sum:  # else the dk/dv kernel sums them (_dkdv_plan)
        n_elements = B * H * L * L
        split_sum = _launch_plan((cdiv(n_elements, SUM_BLOCK),), (n_elements, splits),
                                 dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK=SUM_BLOCK))
    return BiasGradientPlan(partial_shape, partial_dtype, _launch_plan(grid, scalars, constants), split_sum)


def _dkdv_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common, dbias_splits=1):
    """dbias_splits: the bias gradient's row splits, which this kernel sums (before its own work) when there are
    several and KernelOptions.fold_split_sum is on."""
    B, H, R, L, D = shape
    cfg = launch_config("dkdv", L, D, dtype, device)
    # The strides of the bias tiles the kernel reads: launch_backward's key-major copy, as torch lays it out.
    width = _backward_bias_width(L, cfg)
    tiles_s = bias_s if width == L else _contiguous_strides((B, H, width, width))  # launch_backward's padded copy
    copy_s = None
    if cfg.key_major_bias:
        read = torch.empty_strided((B, H, width, width), tiles_s, device="meta")
        if (_options.fold_bias_copy and not read.mT.is_contiguous()  # a copy is needed (.contiguous() copies)
                and width == _backward_bias_width(L, launch_config("dq", L, D, dtype, device))):  # dq reads as wide
            copy_s = read.mT.contiguous().mT.stride()
        tiles_s = read.mT.contiguous().mT.stride()
    grid = (cdiv(L, cfg.block_k), cdiv(R, cfg.rows), B * H)
    grads_s = _contiguous_strides(shape)
    sums = _options.fold_split_sum and dbias_splits > 1
    scalars = (*q_s, *k_s, *v_s, *grads_s, *grads_s, *dout_s, *tiles_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), H, R, L, scale, B * H * L * L if sums else 0,
               dbias_splits if sums else 0)
    constants = dict(ROWS=cfg.rows, ROW_OFFSET_DTYPE=row_offset_dtype(L, D, q_s, dout_s),
                     SETTLE=_settle(dtype, device, cfg), **_prescaled(dict(common), cfg), **_tile_args(L, cfg, common),
                     BIAS_PADDED=width != L, SUM_SPLITS=sums, SUM_BLOCK=SUM_BLOCK, **_launch_options(cfg))
    return KeyValueGradientPlan(cfg.key_major_bias, _launch_plan(grid, scalars, constants), width, sums, copy_s)


def backward_constants(dtype: torch.dtype, device: torch.device, head_dim: int, has_mask: bool,
                       scale: float, has_extents: bool = False) -> tuple:
    """The compile-time constants every backward kernel takes, as (name, value) pairs (a plan signature)."""
    return (("HAS_MASK", has_mask), ("HAS_EXTENTS", has_extents), ("Q_PRESCALED", _q_prescaled(dtype, scale)),
            ("HEAD_DIM", head_dim), ("ACC_DTYPE", _acc_dtype(dtype)), ("DOT_PRECISION", _dot_precision(dtype)),
            ("FAST_EXP2", _fast_exp2(dtype, device)))


class BackwardPlan(NamedTuple):
    dq: LaunchPlan
    dbias: BiasGradientPlan
    dkdv: KeyValueGradientPlan


def _backward_plan(shape, q_s, k_s, v_s, out_s, dout_s, bias_s, mask_s, has_mask, has_extents, dtype, device, scale):
    common = backward_constants(dtype, device, shape[-1], has_mask, scale, has_extents)
    dbias = _dbias_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common)
    dkdv = _dkdv_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common, dbias.splits)
    return BackwardPlan(
        _dq_plan(shape, q_s, k_s, v_s, out_s, dout_s, bias_s, mask_s, dtype, device, scale, common, dkdv), dbias, dkdv)


def launch_backward(dout, q, k, v, bias, mask, out, lse, scale: float, extents=None) -> tuple[torch.Tensor, ...]:
    """The backward kernels' launches, behind both :func:`attention_bwd` and :class:`DirectAttention`:
    returns dq, dk, dv (their inputs' dtypes) and dbias (bias's dtype), summed over the R rows.

    Three kernels and no atomics (see kernels/backward.py). dq runs first (it also writes delta); the
    other two run in the order that keeps the peak memory lower: the bias gradient first when it needs
    fp32 partial sums over row splits (summed in a fixed order by a fourth kernel and freed before dk and dv
    exist; with KernelOptions.fold_split_sum the dk/dv kernel sums them instead, and they live until it
    ends), otherwise dk/dv first (its key-major copy of the bias is freed before the bias gradient exists).
    """
    B, H, R, L, D = q.shape
    if q.numel() == 0:  # no rows, no pairs or no batch: nothing to launch
        empty = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
        return empty[0], empty[1], empty[2], torch.zeros_like(bias)
    mask_t, mask_s, has_mask = _mask_args(mask, q)
    extents_t, has_extents = _extents_args(extents, q)
    device = q.device
    plans = _plan(_backward_plan, q.shape, q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(),
                  bias.stride(), mask_s, has_mask, has_extents, q.dtype, device, scale)

    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    # dq, and delta = rowsum(dO · O) into delta for the two kernels that follow (and dk/dv's key-major copy of
    # the bias into bias_copy, where the plan folds it into dq: KernelOptions.fold_bias_copy).
    dq_bias = bias
    if _options.pad_bias_tiles_backward:
        dq_bias = _pad_bias(bias, _backward_bias_width(L, launch_config("dq", L, D, q.dtype, device)))
    bias_copy = None
    if plans.dkdv.bias_copy_strides is not None:
        width = plans.dkdv.bias_width
        bias_copy = torch.empty_strided((B, H, width, width), plans.dkdv.bias_copy_strides, dtype=bias.dtype,
                                        device=device)
    _launch(attention_bwd_dq_kernel, plans.dq,
            (q, k, v, dq_bias, mask_t, extents_t, out, dout, lse, delta, dq, dq if bias_copy is None else bias_copy))
    del dq_bias
    dbias_plan = plans.dbias

    def bias_partials():
        partial = torch.empty(dbias_plan.partial_shape, dtype=dbias_plan.partial_dtype, device=device)
        _launch(attention_bwd_dbias_kernel, dbias_plan.kernel,
                (q, k, v, bias, mask_t, extents_t, dout, lse, delta, partial))
        return partial

    def key_and_value_gradients(partial=delta, dbias=delta):
        """dk and dv; with the plan's sums_dbias_splits also dbias from the partial sums (else both unused)."""
        plan = plans.dkdv
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        # The same bias values, strided key-major (a copy unless it already is, as for the ending node's
        # transposed view): this kernel's transposed tiles then load as contiguous vectors.
        if bias_copy is not None:  # dq wrote it
            bias_tiles = bias_copy
        else:
            bias_tiles = _pad_bias(bias, plan.bias_width)
            bias_tiles = bias_tiles.mT.contiguous().mT if plan.key_major_bias else bias_tiles
        _launch(attention_bwd_dkdv_kernel, plan.kernel,
                (q, k, v, bias_tiles, mask_t, extents_t, dout, lse, delta, dk, dv, partial, dbias))
        return dk, dv

    if dbias_plan.splits == 1:
        dk, dv = key_and_value_gradients()
        bias_copy = None  # freed (if dq wrote it) before the bias gradient exists
        return dq, dk, dv, bias_partials()[0]  # the kernel wrote the gradient in bias's dtype
    partial = bias_partials()  # fp32 partial sums over row splits
    dbias = torch.empty((B, H, L, L), dtype=bias.dtype, device=device)
    if plans.dkdv.sums_dbias_splits:
        dk, dv = key_and_value_gradients(partial, dbias)
    else:
        _launch(sum_row_splits_kernel, dbias_plan.split_sum, (partial, dbias))
        del partial  # freed before dk and dv exist
        dk, dv = key_and_value_gradients()
    return dq, dk, dv, dbias


@triton_op("flash_tt_attn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
    extents: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward as a custom op (:func:`launch_backward`): dq, dk, dv and dbias."""
    return launch_backward(dout, q, k, v, bias, mask, out, lse, scale, extents)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, extents = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, out, lse, extents)
    ctx.scale = scale
    # lse is an output only for the backward's sake and never receives a gradient: without this,
    # autograd would allocate a zero fp32 tensor the size of lse (B·H·R·L) for every backward.
    ctx.set_materialize_grads(False)


def _gradients(ctx, dout, backward) -> tuple:
    """The gradients for q, k, v, bias, mask, scale and extents, from ``backward`` (the op or its launcher)."""
    if dout is None:  # nothing downstream used the output (lse has no gradient: see _setup_context)
        return None, None, None, None, None, None, None
    q, k, v, bias, mask, out, lse, extents = ctx.saved_tensors
    try:
        dq, dk, dv, dbias = backward(dout, q, k, v, bias, mask, out, lse, ctx.scale, extents)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, "backward", q) from error
    return dq, dk, dv, dbias, None, None, None


def _backward(ctx, dout, dlse):
    return _gradients(ctx, dout, attention_bwd)


torch.library.register_autograd("flash_tt_attn::attention_fwd", _backward, setup_context=_setup_context)


def direct_call_allowed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call with these inputs may launch through :class:`DirectAttention` instead of the custom op:
    a plain eager call. torch.compile and make_fx trace the op, opcheck and Inductor run it on fake or
    functional tensors (tensor subclasses, dispatch modes), and functorch transforms use its registered
    autograd; all of those keep the op."""
    return (_options.direct_eager_calls
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def forward_without_grad(q, k, v, bias, mask, scale: float, extents=None, heads_last: bool = False) -> torch.Tensor:
    """A plain eager forward that records no autograd graph (grad mode off, or no input needing a gradient):
    the forward kernel's launch alone, as :class:`DirectAttention` would run it (``heads_last``: the output's
    layout, :func:`launch_forward`)."""
    with set_wrap_triton_enabled(False):
        return launch_forward(q, k, v, bias, mask, scale, extents, heads_last)[0]


class DirectAttention(torch.autograd.Function):
    """The custom op's forward and backward for plain eager calls (:func:`direct_call_allowed`), launched
    without torch's custom-op dispatch and its layers of Python.

    The same launchers under the same switch as the op's eager calls (wrap_triton off, so register caps
    apply), hence the same configs and the same bits; the same tensors saved for the backward. forward
    takes ``ctx`` itself rather than defining ``setup_context``: Function.apply then skips binding its
    arguments through ``inspect.signature`` on every call (about 40 µs of host time), which only functorch
    transforms need, and those keep the op.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, extents):
        with set_wrap_triton_enabled(False):
            output = launch_forward(q, k, v, bias, mask, scale, extents)
        _setup_context(ctx, (q, k, v, bias, mask, scale, extents), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            # create_graph=True: the op's gradients then refuse to be differentiated (no second derivatives),
            # as they do on the custom op's path; the launcher's would silently have no grad_fn.
            return _gradients(ctx, dout, attention_bwd)
        with set_wrap_triton_enabled(False):
            return _gradients(ctx, dout, launch_backward)


# Elements per program of the layer norm (BLOCK_M rows of BLOCK_N channels): 64 rows of c = 128.
LAYER_NORM_ELEMENTS = 8192


def _layer_norm_plan(shape, x_s, dtype, device, eps):
    B, R, L, N = shape
    block_n = 1 << (N - 1).bit_length()
    block_m = max(1, LAYER_NORM_ELEMENTS // block_n)
    M = B * R * L
    return _launch_plan((cdiv(M, block_m),), (*x_s[:3], R, L, M, eps),
                        dict(N=N, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 8192 else 4))


def launch_layer_norm(x, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer norm of the last dim of x (B, R, L, N), a view with unit stride on its last dim: returns the output
    (contiguous, x's dtype) and the fp32 mean and 1/std of each row, shaped (B, R, L, 1) as PyTorch's
    ``native_layer_norm`` returns them."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel():
        plan = _plan(_layer_norm_plan, x.shape, x.stride(), x.dtype, x.device, eps)
        _launch(layer_norm_fwd_kernel, plan, (x, weight, bias, y, mean, rstd))
    return y, mean, rstd


def layer_norm_without_grad(x, weight, bias, eps: float) -> torch.Tensor:
    """An eager layer norm that records no autograd graph: :func:`launch_layer_norm`'s output, launched through the
    launch cache (wrap_triton off: torch leaves it on outside its custom ops, and a launch through it costs
    ~0.35 ms of host time; PERF.md v32)."""
    with set_wrap_triton_enabled(False):
        return launch_layer_norm(x, weight, bias, eps)[0]


class LayerNormRows(torch.autograd.Function):
    """``F.layer_norm(x, (N,), weight, bias, eps)`` for an eager call on x (B, R, L, N): the forward is
    :func:`launch_layer_norm`; the backward is PyTorch's own (``aten.native_layer_norm_backward``) on the mean
    and 1/std the forward kept, so the gradients are computed as PyTorch computes them."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        with set_wrap_triton_enabled(False):
            y, mean, rstd = launch_layer_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, [x.shape[-1]], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3]))
        return dx, dw, db, None
