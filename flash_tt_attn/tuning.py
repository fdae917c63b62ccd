"""The kernels' launch configurations: one table, keyed by (kernel, head-dim class, dtype class).

Every entry says in one line why it is what it is; PERF.md has the measurements behind each (tuned on an
H100; the H200 is the same chip). :func:`choose` resolves an entry for one launch:

1. a launch that torch.compile traces takes the entry's ``when_traced`` config if it has one: a traced
   launch cannot carry a register cap (``maxnreg``), and a capped tile run uncapped is slower than a
   smaller tile with the same key blocks (the same bits, since rows per tile do not change results);
2. otherwise the entry's ``large`` config where the GPU offers the shared memory it needs;
3. otherwise the entry's ``config``.

CPU tensors run the kernels under Triton's interpreter with small tiles (:func:`interpreter_config`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


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


@dataclass(frozen=True)
class KernelOptions:
    """Process-wide switches of the launchers (set them with ``flash_tt_attn.ops.override``), for tests and
    benchmark variants (a spec's ``variants``).

    fast_exp2: ex2.approx.ftz for 16-bit inputs on the GPU (kernels/common.py).
    settle_accumulators: dq and dk/dv wait for their accumulating product within each iteration.
    dbias_unscaled_scores: the bias gradient's scores come from the unscaled q·kᵀ with bias/scale as its
    accumulator, so q is not rescaled (and sent back to shared memory) in every iteration.
    direct_eager_calls: plain eager calls launch through ``ops.DirectAttention``, not the custom op.
    configs: (kernel, LaunchConfig) pairs that replace the tuning table's choice for those kernels.
    shared_memory_per_program: bytes a GPU offers one program, in place of asking the device (to choose
    the configs a smaller GPU would get).
    dbias_splits: a fixed number of row splits for the bias gradient, in place of ``ops.dbias_splits``.
    row_offset_dtype: a fixed integer type for offsets inside a row, in place of ``ops.row_offset_dtype``.
    register_caps: launch with the configs' ``max_registers``; False launches every config uncapped (as a
    launch traced by torch.compile runs), to measure what a cap buys.
    end_tile_select: the forward's bounds-masked and padded-tail code drops the keys past the end (L or the
    real length) by a select only in the key tile that holds the end, not in every tile (PERF.md, after v25:
    0.97-1.04x on an H100, so off).
    pad_bias_tiles: where the tiles do not divide L, the forward reads a copy of the bias padded with zeros to
    whole tiles, unmasked: Triton proves a mask at ``k < L`` constant over a vector only for L a multiple of
    16, and otherwise reads the bias tile two bytes at a time (PERF.md v27: 1.59x the forward at L = 1000 on an
    H100; on by default). The copy costs one pass over the bias per forward call.
    pad_bias_tiles_backward: the same for dq and dk/dv (dk/dv's key-major copy is then made from the padded
    bias): their bias tiles load unmasked (off: no faster on the H200, PERF.md after v27).
    fold_split_sum: where the bias gradient is summed over row splits, the dk/dv kernel's programs add the
    partial sums up before their own work (the same fixed order, the same bits) instead of a fourth kernel: one
    launch fewer per backward; the fp32 partial sums then live until dk/dv ends (off: graph replay 3-6% slower
    at L = 512-768 on the H200, PERF.md v29).
    fold_bias_copy: where dk/dv reads a key-major copy of the bias (``LaunchConfig.key_major_bias``) that has to
    be made, the dq kernel's programs write it before their own work instead of a PyTorch copy: one launch
    fewer per backward; the copy then exists from dq on rather than from dk/dv on (off: no faster on the H200,
    PERF.md v29).
    block_qkv_copies: ``modules.TriangleAttention`` hands attention() contiguous copies of its q, k and v
    projections, permuted to (B, H, L, L, D); False hands it the permuted views themselves, which the kernels read
    through their strides (three copies of a pair tensor's q, k, v width fewer per forward; docs/performance.md,
    next step 9). Off since v30 was measured (PERF.md: block forward 1.18-1.24x at L = 384-768 on an H100, the
    same bits); the block spec's ``qkv_copies`` variant keeps the copies for comparison.
    block_fused_projections: ``modules.TriangleAttention`` computes q, k, v and the gate with one matmul over the
    four stacked weights instead of four (the normed pair tensor read once; one launch instead of four, forward
    and backward); values equal to rounding. Off: measured on an H100 (PERF.md v31), forward + backward
    1.04-1.07x but +8% training peak memory (the strided views keep the gate's columns alive).
    block_triton_layer_norm: ``modules.TriangleAttention``'s eager layer norm runs the Triton kernel
    (kernels/layer_norm.py: many rows per program, rows read through their strides) instead of PyTorch's, whose
    CUDA kernel reaches a fraction of the bandwidth at c = 128; the backward stays PyTorch's. Values equal to
    rounding; float64, autocast and torch.compile keep PyTorch's norm (api.layer_norm_rows). On since v32 was
    measured (PERF.md: block forward 1.21-1.35x at L = 384-768 on an H100, forward + backward 1.04-1.05x); off
    gives PyTorch's norm back.
    block_heads_last_output: ``modules.TriangleAttention``'s forward without autograd asks attention() for its
    output heads-last (a permuted view of a contiguous (B, R, L, H, D) tensor: ``api.run_attention``), the layout
    in which the block gates it and projects its H·D channels: the gate's multiply then reads two contiguous
    tensors instead of one permuted. The same values; training keeps the contiguous (B, H, R, L, D) output.
    On since v33 was measured (PERF.md: block forward 1.04-1.05x at L = 384-768 on an H100, the same bits); the
    block and long-inference specs' ``heads_first_output`` variants turn it off for comparison.
    """

    fast_exp2: bool = True
    settle_accumulators: bool = True
    dbias_unscaled_scores: bool = True
    direct_eager_calls: bool = True
    configs: tuple = ()
    shared_memory_per_program: Optional[int] = None
    dbias_splits: Optional[int] = None
    row_offset_dtype: Optional[object] = None
    register_caps: bool = True
    end_tile_select: bool = False
    pad_bias_tiles: bool = True
    pad_bias_tiles_backward: bool = False
    fold_split_sum: bool = False
    fold_bias_copy: bool = False
    block_qkv_copies: bool = False
    block_fused_projections: bool = False
    block_triton_layer_norm: bool = True
    block_heads_last_output: bool = True


class LargeConfig(NamedTuple):
    """A config that needs more shared memory per program than some GPUs offer, with the bytes it needs as
    Triton 3.6 compiles it for sm_90 (the same with a mask and with L not a multiple of the tiles)."""

    config: LaunchConfig
    shared_memory: int


class Entry(NamedTuple):
    config: LaunchConfig
    why: str
    large: Optional[LargeConfig] = None
    when_traced: Optional[LaunchConfig] = None


KERNELS = ("forward", "dq", "dkdv", "dbias")

# Rows i per program under the interpreter: the GPU's row counts at D = 32 (tests force the others).
_INTERPRETER_ROWS = {"forward": 2, "dq": 1, "dkdv": 1, "dbias": 1}


def head_dim_class(head_dim: int) -> str:
    return "128" if head_dim >= 128 else "64" if head_dim == 64 else "16-32"


def dtype_class(dtype: torch.dtype) -> str:
    """fp32 and fp64 run their products on the FMA units; fp16 and bf16 on the tensor cores."""
    return "32-bit" if dtype in (torch.float32, torch.float64) else "16-bit"


_PAL = dict(pipeline_all_loads=True)
_FMA_WHY = "fp32/fp64 products run on the FMA units: small tiles, untuned (fp32 is for checks, fp64 gradchecks)"

TABLE: dict[tuple[str, str, str], Entry] = {
    # forward
    ("forward", "16-32", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 3, rows=2, max_registers=168, **_PAL),
        "two rows i per program share each bias tile and give the scheduler two independent chains; capped at "
        "168 registers, three programs per SM also with bounds masks or a padded tail (180 and 186 uncapped)",
        when_traced=LaunchConfig(64, 64, 4, 3, rows=2, **_PAL)),
    ("forward", "64", "16-bit"): Entry(
        LaunchConfig(128, 64, 8, 3, max_registers=128, prescale=False, **_PAL),
        "128 queries, 8 warps, q in shared memory, capped at 128 registers: two programs per SM",
        when_traced=LaunchConfig(64, 64, 4, 3, prescale=False, **_PAL)),
    ("forward", "128", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 2, **_PAL),
        "128 queries per program halve the k and v bytes per score where shared memory allows",
        large=LargeConfig(LaunchConfig(128, 64, 8, 3, prescale=False, **_PAL), 163_840)),
    # dq
    ("dq", "16-32", "16-bit"): Entry(LaunchConfig(64, 64, 4, 3, **_PAL), "square tiles, three programs per SM"),
    ("dq", "64", "16-bit"): Entry(
        LaunchConfig(128, 32, 8, 3, prescale=False, **_PAL),
        "128 queries, 8 warps, q in shared memory: 116 registers, two programs per SM"),
    ("dq", "128", "16-bit"): Entry(
        LaunchConfig(64, 32, 4, 2, prescale=False, **_PAL),
        "128x32 tiles fit two programs per SM only under a 128-register cap; 64x32 elsewhere",
        large=LargeConfig(LaunchConfig(128, 32, 8, 2, max_registers=128, prescale=False, **_PAL), 106_496),
        when_traced=LaunchConfig(64, 32, 4, 2, prescale=False, **_PAL)),
    # dk/dv: its bias tiles are transposed; a key-major copy of the bias makes them contiguous loads
    ("dkdv", "16-32", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 3, key_major_bias=True, max_registers=168, **_PAL),
        "168 registers (no spills): three programs per SM; traced launches run the serialized form instead"),
    ("dkdv", "64", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 3, **_PAL), "the key-major bias copy gains nothing at D = 64"),
    ("dkdv", "128", "16-bit"): Entry(
        LaunchConfig(32, 64, 4, 3, key_major_bias=True, prescale=False, **_PAL),
        "32 queries per step: dk and dv take 128 registers, 64x64 steps spilled"),
    # bias gradient (rows unused)
    ("dbias", "16-32", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 3, **_PAL), "three programs of 4 warps per SM beat one of 8 at D = 32"),
    ("dbias", "64", "16-bit"): Entry(
        LaunchConfig(64, 64, 4, 3, **_PAL),
        "64x128 tiles with 8 warps share each q and dO tile between two warpgroups, where shared memory allows",
        large=LargeConfig(LaunchConfig(64, 128, 8, 3, **_PAL), 148_480)),
    ("dbias", "128", "16-bit"): Entry(
        LaunchConfig(64, 32, 4, 2, **_PAL),
        "64x128 tiles with 8 warps share each q and dO tile between two warpgroups, where shared memory allows",
        large=LargeConfig(LaunchConfig(64, 128, 8, 2, **_PAL), 197_120)),
}
for _kernel, _config in (("forward", LaunchConfig(64, 32, 4, 2)), ("dq", LaunchConfig(32, 32, 4, 1)),
                         ("dkdv", LaunchConfig(32, 32, 4, 1)), ("dbias", LaunchConfig(32, 32, 4, 1))):
    for _head_dims in ("16-32", "64", "128"):
        TABLE[_kernel, _head_dims, "32-bit"] = Entry(_config, _FMA_WHY)


@functools.cache
def max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may use on this CUDA device (Triton's own limit)."""
    import triton  # noqa: PLC0415 (only GPU launches get here)

    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def interpreter_config(kernel: str, L: int) -> LaunchConfig:
    """Small tiles for Triton's interpreter (CPU tensors), with the GPU's rows per program at D = 32."""
    block = 16 if L <= 16 else 32
    return LaunchConfig(block, block, 1, 1, rows=_INTERPRETER_ROWS[kernel])


def choose(kernel: str, L: int, head_dim: int, dtype: torch.dtype, device: torch.device, traced: bool,
           shared_memory=None) -> LaunchConfig:
    """The config of one launch of ``kernel`` ("forward", "dq", "dkdv" or "dbias"); ``shared_memory(index)``
    gives a CUDA device's bytes per program (default :func:`max_shared_memory`)."""
    if device.type != "cuda":
        return interpreter_config(kernel, L)
    entry = TABLE[kernel, head_dim_class(head_dim), dtype_class(dtype)]
    if traced and entry.when_traced is not None:
        return entry.when_traced
    if entry.large is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if (shared_memory or max_shared_memory)(index) >= entry.large.shared_memory:
            return entry.large.config
    return entry.config
