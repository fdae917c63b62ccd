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

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ._compat import env_flag
from .errors import out_of_memory
from .kernels.backward import (
    attention_bwd_dbias_kernel,
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    sum_row_splits_kernel,
)
from .kernels.forward import attention_fwd_kernel
from .launch import FastLauncher


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel.

    rows: rows i per program (forward 1, 2 or 4; dq and dk/dv 1 or 2; unused by dbias).
    pipeline_all_loads: software-pipeline every load of the main loop num_stages deep, the bias
    tile, lse and delta included; otherwise Triton pipelines only the matrix products' operands
    and the other loads wait on memory in every iteration.
    key_major_bias: (dk/dv only) read the bias from a key-major copy, ``bias.mT.contiguous()``, made
    once per backward (B·H·L² elements): that kernel's tiles are bias[j-block, k-block] transposed,
    which the row-major bias can only give through scattered 2-byte loads and byte shuffles.
    max_registers: cap on registers per thread (Triton's ``maxnreg``), so that more programs fit on
    an SM; None leaves the choice to the compiler.
    settle: (dq and dk/dv only) wait for the accumulating product within each iteration
    (kernels/common.py: ``settle``); False leaves it in flight across the loop's back edge, and
    ptxas then serializes the kernel's wgmmas, which needs fewer registers.
    prescale: (forward, dq and dk/dv) scale the loop-invariant operand (q, or k in dk/dv) once in its
    own dtype where that cannot overflow; False applies the scale to the fp32 product instead, and the
    operand then stays in shared memory rather than in registers (fewer registers, one more multiply
    per score).
    """

    block_j: int
    block_k: int
    num_warps: int
    num_stages: int
    rows: int = 1
    pipeline_all_loads: bool = False
    key_major_bias: bool = False
    max_registers: Optional[int] = None
    settle: bool = True
    prescale: bool = True

    @property
    def loop_stages(self) -> Optional[int]:
        """The kernels' LOOP_STAGES: the main loop's pipelining depth, or None for Triton's default."""
        return self.num_stages if self.pipeline_all_loads else None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``) in the environment now."""
    return env_flag("TRITON_INTERPRET")


# Triton decides at @triton.jit time (the import of the kernels) whether they are interpreted;
# setting TRITON_INTERPRET later does not change that, so the API asks this instead.
KERNELS_INTERPRETED = interpreter_enabled()


def _interpreter_config(L: int, rows: int) -> LaunchConfig:
    block = 16 if L <= 16 else 32
    return LaunchConfig(block, block, 1, 1, rows=rows)


# Probes on the H100 chose these (probes 6 and 7 first; rows in experiments/tuning/, numbers in PERF.md). fp32
# (and fp64, which the API routes to the reference on CUDA) runs its products on the FMA units: small tiles,
# untuned.
def forward_config(L: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Tiles for the forward kernel (rows i per program: 1, 2 or 4)."""
    if device.type != "cuda":
        return _interpreter_config(L, rows=2)  # the GPU's row count; tests patch in 1 and 4
    if dtype in (torch.float32, torch.float64):
        return LaunchConfig(64, 32, 4, 2)
    if head_dim >= 128:
        # 128 queries per program halve the k and v bytes read per score; q stays in shared memory (unscaled),
        # which keeps the tile at 219 registers (probe 27: 0.99 -> 0.90 ms at B=1 H=4 L=512 bf16).
        return _if_it_fits("forward", 128, device, otherwise=LaunchConfig(64, 64, 4, 2, pipeline_all_loads=True))
    if head_dim == 64:
        # 128 queries and 8 warps with q in shared memory, capped at 128 registers: two programs of 8 warps per
        # SM (probe 29: 4.28-4.53 -> 3.96-4.24 ms at B=4 H=8 L=512 fp16). Uncapped the tile runs one program
        # per SM, 12% slower than 64x64 (probe 28), so traced launches take 64x64 tiles.
        return _uncapped_when_traced(LaunchConfig(128, 64, 8, 3, pipeline_all_loads=True, max_registers=128,
                                                  prescale=False),
                                     LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True, prescale=False))
    return LaunchConfig(64, 64, 4, 3, rows=2, pipeline_all_loads=True)


def dq_config(L: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Tiles for the dq backward kernel (rows i per program: 1 or 2)."""
    if device.type != "cuda":
        return _interpreter_config(L, rows=1)  # the GPU's row count; tests patch in 2
    if dtype in (torch.float32, torch.float64):
        return LaunchConfig(32, 32, 4, 1)
    if head_dim >= 128:
        # The 128x32 tiles run two programs of 8 warps per SM only under their 128-register cap: uncapped they
        # need 147 registers, one program per SM (probe 31: 1.74 ms compiled against 1.14 eager). Traced
        # launches, and GPUs without the shared memory for them, take 64x32 tiles (three programs of 4 warps).
        narrow = LaunchConfig(64, 32, 4, 2, pipeline_all_loads=True, prescale=False)
        return _uncapped_when_traced(_if_it_fits("dq", 128, device, otherwise=narrow), narrow)
    if head_dim == 64:
        # 128 queries and 8 warps with q in shared memory: 116 registers, two programs per SM (probe 28: the
        # kernel 5.5-5.7 -> 5.0-5.2 ms at B=4 H=8 L=512 fp16).
        return LaunchConfig(128, 32, 8, 3, pipeline_all_loads=True, prescale=False)
    return LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True)


def dkdv_config(L: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Tiles for the dk/dv backward kernel (rows i per program: 1 or 2). Its bias tiles are transposed:
    pipelining them from the row-major bias made it slower (probe 6: byte shuffles); from a key-major
    copy it is faster at D = 32 and 128 (probe 9), and no different at D = 64."""
    if device.type != "cuda":
        return _interpreter_config(L, rows=1)  # the GPU's row count; tests patch in 2
    if dtype in (torch.float32, torch.float64):
        return LaunchConfig(32, 32, 4, 1)
    if head_dim >= 128:
        # 32 queries per step: dk and dv take 128 of the registers, and 64x64 steps spilled (255 registers);
        # k unscaled in shared memory (probe 27: 1.54-1.56 -> 1.50-1.52 ms at B=1 H=4 L=512 bf16).
        return LaunchConfig(32, 64, 4, 3, pipeline_all_loads=True, key_major_bias=True, prescale=False)
    if head_dim == 64:
        return LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True)
    # 168 registers (175 uncapped, no spills): three programs per SM instead of two. Waiting for dk
    # within each iteration (SETTLE_ACCUMULATORS) needs more registers than probe 10's cap of 128.
    # Traced launches cannot be capped and run the serialized form instead (_settle).
    return LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True, key_major_bias=True, max_registers=168)


def dbias_config(L: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """Tiles for the bias-gradient kernel (its rows field is unused).

    At D = 64 and 128, 64×128 tiles with 8 warps: each warpgroup takes 64 of the 128 keys, and the two
    share every q and dO tile they load (probe 22: the kernel 1.61 → 1.04 ms at D = 128, B=1 H=4 L=512
    bf16; 4.5–5.1 → 4.1–4.2 ms at D = 64, B=4 H=8 L=512 fp16). At D = 32 the same tiles are slower (one
    program of 8 warps per SM instead of three of 4)."""
    if device.type != "cuda":
        return _interpreter_config(L, rows=1)
    if dtype in (torch.float32, torch.float64):
        return LaunchConfig(32, 32, 4, 1)
    if head_dim >= 128:
        return _if_it_fits("dbias", 128, device, otherwise=LaunchConfig(64, 32, 4, 2, pipeline_all_loads=True))
    if head_dim == 64:
        return _if_it_fits("dbias", 64, device, otherwise=LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True))
    return LaunchConfig(64, 64, 4, 3, pipeline_all_loads=True)


# The 16-bit configs that need more shared memory per program than GPUs with 99 KB offer (L4, RTX 40xx), with
# what they need in bytes as Triton 3.6 compiles them for sm_90 offline (the same with a mask and with L not a
# multiple of the tiles; PERF.md v15, v16). An H100 offers 227 KB, an A100 163 KB. A GPU with less gets the
# chooser's other config; every other 16-bit config needs at most 97 KB (the bias gradient's at D = 64).
LARGE_CONFIGS: dict[tuple[str, int], tuple[LaunchConfig, int]] = {
    ("forward", 128): (LaunchConfig(128, 64, 8, 3, pipeline_all_loads=True, prescale=False), 163_840),
    # 128 registers, no spills without a mask (24 bytes with one): two programs of 8 warps per SM (probe 27).
    ("dq", 128): (LaunchConfig(128, 32, 8, 2, pipeline_all_loads=True, max_registers=128, prescale=False), 106_496),
    ("dbias", 128): (LaunchConfig(64, 128, 8, 2, pipeline_all_loads=True), 197_120),
    ("dbias", 64): (LaunchConfig(64, 128, 8, 3, pipeline_all_loads=True), 148_480),
}


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may use on this CUDA device (Triton's own limit)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _uncapped_when_traced(capped: LaunchConfig, uncapped: LaunchConfig) -> LaunchConfig:
    """capped, except in a traced launch (torch.compile), which cannot carry its register cap
    (_launch_options): there uncapped, a config with the same key blocks and arithmetic per query, so that
    compiled and eager calls give the same bits (probes 30 and 33: rows per tile do not change the results)."""
    return uncapped if _launch_is_traced() else capped


def _if_it_fits(kernel: str, head_dim: int, device: torch.device, otherwise: LaunchConfig) -> LaunchConfig:
    """LARGE_CONFIGS[kernel, head_dim] if the device has the shared memory for it, else ``otherwise``."""
    cfg, needed = LARGE_CONFIGS[kernel, head_dim]
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cfg if _max_shared_memory(index) >= needed else otherwise


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 must not silently use TF32: gradient checks need full precision.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# ex2.approx.ftz on the GPU for 16-bit inputs (see kernels/common.py); a switch for benchmarks.
FAST_EXP2 = True


def _fast_exp2(dtype: torch.dtype, device: torch.device) -> bool:
    return FAST_EXP2 and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


# Switches for benchmarks (probe 11 timed both settings; PERF.md v12):
# dq and dk/dv wait for their accumulating product within each iteration (kernels/common.py: settle);
SETTLE_ACCUMULATORS = True
# the bias gradient's scores come from the unscaled q·kᵀ with bias/scale as its accumulator, so q is not
# rescaled (and sent back to shared memory) in every iteration.
DBIAS_UNSCALED_SCORES = True


def _launch_is_traced() -> bool:
    """True while torch.compile (or make_fx) traces a launch: torch switches wrap_triton off inside the
    custom ops' eager calls and leaves it on while tracing."""
    return is_wrap_triton_enabled()


def _settle(dtype: torch.dtype, device: torch.device, cfg: LaunchConfig) -> bool:
    """Whether dq and dk/dv wait for their accumulating product within each iteration (kernels/common.py)."""
    # An fp32 register identity in inline PTX: GPU only, and only where the accumulators are fp32.
    if not (SETTLE_ACCUMULATORS and cfg.settle and device.type == "cuda" and dtype != torch.float64):
        return False
    # A traced launch cannot carry the register cap (_launch_options), and settled accumulators fit three
    # programs per SM only under it: there the serialized form (148 registers uncapped) is 9-11% faster
    # at the small targets (probe 19), with the same bits.
    return cfg.max_registers is None or not _launch_is_traced()


def _dbias_unscaled_scores(scale: float) -> bool:
    return DBIAS_UNSCALED_SCORES and scale != 0.0


def _q_prescaled(dtype: torch.dtype, scale: float) -> bool:
    """Whether the kernels may scale q in its own dtype: not for fp16 with |scale| > 1 (q·scale could overflow)."""
    return not (dtype == torch.float16 and abs(scale) > 1.0)


def _prescaled(common: dict, cfg: LaunchConfig) -> dict:
    """The backward's constants (backward_constants) for a dq or dk/dv launch under cfg: its operand is
    prescaled only where the dtype and scale allow it and cfg asks for it."""
    return dict(common, Q_PRESCALED=common["Q_PRESCALED"] and cfg.prescale)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _even(L: int, cfg: LaunchConfig) -> bool:
    """L is a multiple of both tile sizes: the kernels can drop their bounds masks."""
    return L % cfg.block_j == 0 and L % cfg.block_k == 0


def _tile_args(L: int, cfg: LaunchConfig) -> dict:
    return dict(EVEN_L=_even(L, cfg), BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k)


def _launch_options(cfg: LaunchConfig) -> dict:
    options = dict(LOOP_STAGES=cfg.loop_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # While torch.compile (or make_fx) traces the launches, wrap_triton forwards num_warps and num_stages
    # but not maxnreg: a compiled graph runs without the register cap (and _settle then picks the
    # serialized form of a capped config, which needs no cap).
    if cfg.max_registers is not None and not _launch_is_traced():
        options["maxnreg"] = cfg.max_registers
    return options


def _row_offset_dtype(L: int, head_dim: int, *strides: tuple):
    """Integer type of the offsets inside one row i's (L, D) slice of tensors with these strides: int32 when
    every such offset fits (fewer address instructions in the kernels' main loops), int64 otherwise."""
    span = max((L - 1) * abs(s[3]) + (head_dim - 1) * abs(s[4]) for s in strides)
    return tl.int32 if span < 2**31 else tl.int64


_LAUNCHERS = {kernel: FastLauncher(kernel) for kernel in (
    attention_fwd_kernel, attention_bwd_dq_kernel, attention_bwd_dkdv_kernel, attention_bwd_dbias_kernel,
    sum_row_splits_kernel)}


def _launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, constants: dict) -> None:
    """``kernel[grid](*tensors, *scalars, **constants)``: through wrap_triton while torch.compile traces the
    launch, otherwise through the kernel's launch cache (flash_tt_attn/launch.py), which skips Triton's
    per-launch binding of arguments it has already seen."""
    if _launch_is_traced():
        wrap_triton(kernel)[grid](*tensors, *scalars, **constants)
    else:
        _LAUNCHERS[kernel].launch(grid, tensors, scalars, constants)


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


SUM_BLOCK = 1024  # elements per program of the split reduction


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0. Not triton.cdiv, a Triton constexpr_function that costs the host about 2 µs a call
    (probe 47); the launchers call this a dozen times per backward."""
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


def _chooser_state() -> tuple:
    """Everything module-level that a launch plan is built from: the config choosers and switches (tests and
    benchmarks replace them), so that a replaced one is never served a plan built by another."""
    return (forward_config, dq_config, dkdv_config, dbias_config, dbias_splits, _row_offset_dtype,
            _max_shared_memory, FAST_EXP2, SETTLE_ACCUMULATORS, DBIAS_UNSCALED_SCORES)


_PLANS: dict = {}


def _plan(build, *signature):
    """``build(*signature)``, the launch's grid, scalar arguments and constants, computed once per signature
    (shapes, strides, dtype, device, scale, mask layout) and chooser state on the eager path. While
    torch.compile traces a launch the shapes may be symbolic, so the plan is built afresh and not kept."""
    if _launch_is_traced():
        return build(*signature)
    key = (build, _chooser_state(), signature)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4096:  # shapes that keep changing: start over rather than grow without bound
            _PLANS.clear()
        plan = _PLANS[key] = build(*signature)
    return plan


def _forward_plan(shape, q_s, k_s, v_s, bias_s, mask_s, has_mask, dtype, device, scale):
    B, H, R, L, D = shape
    cfg = forward_config(L, D, dtype, device)
    if cfg.rows not in (1, 2, 4):
        raise ValueError(f"the forward kernel takes 1, 2 or 4 rows per program, not {cfg.rows}")
    grid = (cdiv(L, cfg.block_j), cdiv(R, cfg.rows), B * H)
    scalars = (*q_s, *k_s, *v_s, *_contiguous_strides(shape), *bias_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), H, R, L, scale)
    constants = dict(
        HAS_MASK=has_mask, EVEN_L=_even(L, cfg), Q_PRESCALED=_q_prescaled(dtype, scale) and cfg.prescale,
        ROWS=cfg.rows, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k, HEAD_DIM=D,
        ACC_DTYPE=_acc_dtype(dtype), DOT_PRECISION=_dot_precision(dtype),
        FAST_EXP2=_fast_exp2(dtype, device), ROW_OFFSET_DTYPE=_row_offset_dtype(L, D, k_s, v_s),
        **_launch_options(cfg))
    return grid, scalars, constants


def launch_forward(q, k, v, bias, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's launch, behind both :func:`attention_fwd` and :class:`DirectAttention`:
    returns the output (q's dtype) and the base-2 log-sum-exp (B, H, R, L), fp32.

    q, k, v: (B, H, R, L, D) hold R rows i (R = L for the whole pair tensor, fewer for a
    shard of rows); bias (B, H, L, L); mask (B, R, L) or None.
    """
    B, H, R, L, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, R, L), dtype=_lse_dtype(q.dtype), device=q.device)
    if q.numel() == 0:  # no rows (an empty shard), no pairs or no batch: nothing to launch
        return out, lse
    mask_t, mask_strides, has_mask = _mask_args(mask, q)
    grid, scalars, constants = _plan(_forward_plan, q.shape, q.stride(), k.stride(), v.stride(), bias.stride(),
                                     mask_strides, has_mask, q.dtype, q.device, scale)
    _launch(attention_fwd_kernel, grid, (q, k, v, bias, mask_t, out, lse), scalars, constants)
    return out, lse


@triton_op("flash_tt_attn::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    mask: Optional[torch.Tensor], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward as a custom op (:func:`launch_forward`): the output and the base-2 log-sum-exp, fp32."""
    return launch_forward(q, k, v, bias, mask, scale)


def _dq_plan(shape, q_s, k_s, v_s, out_s, dout_s, bias_s, mask_s, dtype, device, scale, common):
    B, H, R, L, D = shape
    cfg = dq_config(L, D, dtype, device)
    if cfg.rows not in (1, 2):
        raise ValueError(f"the dq kernel takes 1 or 2 rows per program, not {cfg.rows}")
    grid = (cdiv(L, cfg.block_j), cdiv(R, cfg.rows), B * H)
    scalars = (*q_s, *_contiguous_strides(shape), *k_s, *v_s, *out_s, *dout_s, *bias_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), H, R, L, scale)
    constants = dict(ROWS=cfg.rows, ROW_OFFSET_DTYPE=_row_offset_dtype(L, D, k_s, v_s),
                     SETTLE=_settle(dtype, device, cfg), **_prescaled(dict(common), cfg), **_tile_args(L, cfg),
                     **_launch_options(cfg))
    return grid, scalars, constants


def _dbias_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common):
    """The bias-gradient kernel's launch, and the split sum's when the R rows are split (``sum`` is None
    otherwise): the kernel sums ``rows_per_split`` rows i into each of ``splits`` partial gradients."""
    B, H, R, L, D = shape
    cfg = dbias_config(L, D, dtype, device)
    rows_per_split = cdiv(R, dbias_splits(B, H, R, L, D, cfg))
    splits = cdiv(R, rows_per_split)
    # One split: the kernel writes the gradient in bias's dtype directly (no fp32 buffer, no cast).
    partial_dtype = dtype if splits == 1 else _lse_dtype(dtype)
    partial_shape = (splits, B, H, L, L)
    grid = (cdiv(L, cfg.block_j) * cdiv(L, cfg.block_k), splits, B * H)
    scalars = (*q_s, *k_s, *v_s, *dout_s, *bias_s, *mask_s, *_contiguous_strides((B, H, R, L)),
               *_contiguous_strides(partial_shape), H, R, L, rows_per_split, scale)
    constants = dict(UNSCALED_SCORES=_dbias_unscaled_scores(scale), **dict(common), **_tile_args(L, cfg),
                     **_launch_options(cfg))
    split_sum = None
    if splits > 1:
        n_elements = B * H * L * L
        split_sum = ((cdiv(n_elements, SUM_BLOCK),), (n_elements, splits),
                     dict(ACC_DTYPE=_acc_dtype(dtype), BLOCK=SUM_BLOCK))
    return partial_shape, partial_dtype, grid, scalars, constants, split_sum


def _dkdv_plan(shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common):
    B, H, R, L, D = shape
    cfg = dkdv_config(L, D, dtype, device)
    if cfg.rows not in (1, 2):
        raise ValueError(f"the dk/dv kernel takes 1 or 2 rows per program, not {cfg.rows}")
    # The strides of the bias tiles the kernel reads: launch_backward's key-major copy, as torch lays it out.
    tiles_s = bias_s
    if cfg.key_major_bias:
        tiles_s = torch.empty_strided((B, H, L, L), bias_s, device="meta").mT.contiguous().mT.stride()
    grid = (cdiv(L, cfg.block_k), cdiv(R, cfg.rows), B * H)
    grads_s = _contiguous_strides(shape)
    scalars = (*q_s, *k_s, *v_s, *grads_s, *grads_s, *dout_s, *tiles_s, *mask_s,
               *_contiguous_strides((B, H, R, L)), H, R, L, scale)
    constants = dict(ROWS=cfg.rows, ROW_OFFSET_DTYPE=_row_offset_dtype(L, D, q_s, dout_s),
                     SETTLE=_settle(dtype, device, cfg), **_prescaled(dict(common), cfg), **_tile_args(L, cfg),
                     **_launch_options(cfg))
    return cfg.key_major_bias, grid, scalars, constants


def backward_constants(dtype: torch.dtype, device: torch.device, head_dim: int, has_mask: bool,
                       scale: float) -> tuple:
    """The compile-time constants every backward kernel takes, as (name, value) pairs (a plan signature)."""
    return (("HAS_MASK", has_mask), ("Q_PRESCALED", _q_prescaled(dtype, scale)), ("HEAD_DIM", head_dim),
            ("ACC_DTYPE", _acc_dtype(dtype)), ("DOT_PRECISION", _dot_precision(dtype)),
            ("FAST_EXP2", _fast_exp2(dtype, device)))


def launch_backward(dout, q, k, v, bias, mask, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """The backward kernels' launches, behind both :func:`attention_bwd` and :class:`DirectAttention`:
    returns dq, dk, dv (their inputs' dtypes) and dbias (bias's dtype), summed over the R rows.

    Three kernels and no atomics (see kernels/backward.py). dq runs first (it also writes delta); the
    other two run in the order that keeps the peak memory lower: the bias gradient first when it needs
    fp32 partial sums over row splits (freed before dk and dv exist), otherwise dk/dv first (its
    key-major copy of the bias is freed before the bias gradient exists).
    """
    B, H, R, L, D = q.shape
    if q.numel() == 0:  # no rows, no pairs or no batch: nothing to launch
        empty = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
        return empty[0], empty[1], empty[2], torch.zeros_like(bias)
    mask_t, mask_s, has_mask = _mask_args(mask, q)
    dtype, device = q.dtype, q.device
    common = backward_constants(dtype, device, D, has_mask, scale)
    shape, q_s, k_s, v_s, dout_s, bias_s = q.shape, q.stride(), k.stride(), v.stride(), dout.stride(), bias.stride()

    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    grid, scalars, constants = _plan(_dq_plan, shape, q_s, k_s, v_s, out.stride(), dout_s, bias_s, mask_s,
                                     dtype, device, scale, common)
    # dq, and delta = rowsum(dO · O) into delta for the two kernels that follow.
    _launch(attention_bwd_dq_kernel, grid, (q, k, v, bias, mask_t, out, dout, lse, delta, dq), scalars, constants)

    def bias_gradient():
        partial_shape, partial_dtype, grid, scalars, constants, split_sum = _plan(
            _dbias_plan, shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common)
        partial = torch.empty(partial_shape, dtype=partial_dtype, device=device)
        _launch(attention_bwd_dbias_kernel, grid, (q, k, v, bias, mask_t, dout, lse, delta, partial), scalars,
                constants)
        if split_sum is None:
            return partial[0]
        # Fixed-order reduction over the splits: deterministic, unlike float atomics.
        dbias = torch.empty((B, H, L, L), dtype=bias.dtype, device=device)
        _launch(sum_row_splits_kernel, split_sum[0], (partial, dbias), *split_sum[1:])
        return dbias

    def key_and_value_gradients():
        key_major, grid, scalars, constants = _plan(_dkdv_plan, shape, q_s, k_s, v_s, dout_s, bias_s, mask_s,
                                                    dtype, device, scale, common)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        # The same bias values, strided key-major (a copy unless it already is, as for the ending node's
        # transposed view): this kernel's transposed tiles then load as contiguous vectors.
        bias_tiles = bias.mT.contiguous().mT if key_major else bias
        _launch(attention_bwd_dkdv_kernel, grid, (q, k, v, bias_tiles, mask_t, dout, lse, delta, dk, dv), scalars,
                constants)
        return dk, dv

    if _plan(_dbias_plan, shape, q_s, k_s, v_s, dout_s, bias_s, mask_s, dtype, device, scale, common)[-1]:
        dbias = bias_gradient()  # fp32 partial sums over row splits: freed before dk and dv exist
        dk, dv = key_and_value_gradients()
    else:
        dk, dv = key_and_value_gradients()
        dbias = bias_gradient()
    return dq, dk, dv, dbias


@triton_op("flash_tt_attn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward as a custom op (:func:`launch_backward`): dq, dk, dv and dbias."""
    return launch_backward(dout, q, k, v, bias, mask, out, lse, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, mask, out, lse)
    ctx.scale = scale
    # lse is an output only for the backward's sake and never receives a gradient: without this,
    # autograd would allocate a zero fp32 tensor the size of lse (B·H·R·L) for every backward.
    ctx.set_materialize_grads(False)


def _gradients(ctx, dout, backward) -> tuple:
    """The gradients for q, k, v, bias, mask and scale, from ``backward`` (the op or its launcher)."""
    if dout is None:  # nothing downstream used the output (lse has no gradient: see _setup_context)
        return None, None, None, None, None, None
    q, k, v, bias, mask, out, lse = ctx.saved_tensors
    try:
        dq, dk, dv, dbias = backward(dout, q, k, v, bias, mask, out, lse, ctx.scale)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, "backward", q) from error
    return dq, dk, dv, dbias, None, None


def _backward(ctx, dout, dlse):
    return _gradients(ctx, dout, attention_bwd)


torch.library.register_autograd("flash_tt_attn::attention_fwd", _backward, setup_context=_setup_context)


# Plain eager calls launch through DirectAttention; False sends them through the custom op (tests compare both).
DIRECT_EAGER_CALLS = True


def direct_call_allowed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call with these inputs may launch through :class:`DirectAttention` instead of the custom op:
    a plain eager call. torch.compile and make_fx trace the op, opcheck and Inductor run it on fake or
    functional tensors (tensor subclasses, dispatch modes), and functorch transforms use its registered
    autograd; all of those keep the op."""
    return (DIRECT_EAGER_CALLS
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def forward_without_grad(q, k, v, bias, mask, scale: float) -> torch.Tensor:
    """A plain eager forward that records no autograd graph (grad mode off, or no input needing a gradient):
    the forward kernel's launch alone, as :class:`DirectAttention` would run it."""
    with set_wrap_triton_enabled(False):
        return launch_forward(q, k, v, bias, mask, scale)[0]


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
    def forward(ctx, q, k, v, bias, mask, scale):
        with set_wrap_triton_enabled(False):
            output = launch_forward(q, k, v, bias, mask, scale)
        _setup_context(ctx, (q, k, v, bias, mask, scale), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            # create_graph=True: the op's gradients then refuse to be differentiated (no second derivatives),
            # as they do on the custom op's path; the launcher's would silently have no grad_fn.
            return _gradients(ctx, dout, attention_bwd)
        with set_wrap_triton_enabled(False):
            return _gradients(ctx, dout, launch_backward)
