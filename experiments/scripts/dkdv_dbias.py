"""Probe 50's kernel: the bias gradient folded into the dk/dv pass, deterministic without a second kernel.

The library's bias gradient is its own kernel (kernels/backward.py), which recomputes p and dp (two more
products and an exponential per score) and reads q, dO, k and v again: 12 bytes per score from L2 at D=128
(64×128 tiles), where it is L2-bound (PERF.md next step 5) and keeps D=128 forward+backward at 0.90× flex.
The dk/dv pass already has ds = p·(dp − delta) for every score. Here each dk/dv program takes a group of
rows i of one key block and, for every query block, adds its ds tile into an fp32 partial sum of that row
group with relaxed atomic adds. Each element of a group's partial sum then has one writer, one thread of one
program, which adds in the order of i, and same-address writes of one thread keep program order: the sums
are bitwise reproducible, as the library's fixed-order split sums are. 4 bytes of L2 atomics per score
instead of 12 bytes of loads, two products and an exponential.

The partial sums are key-major ([split, b, h, k, j], as ds is laid out in this kernel, so a warp's atomics
are contiguous); the library's fixed-order split sum then adds them up and a transpose makes dbias.

The library's dk/dv kernel cut down to contiguous inputs, L a multiple of the tiles, no mask, one row at a
time; its configs come from ops.dkdv_config. An experiment, not a library path.
"""

import torch
import triton
import triton.language as tl

from flash_tt_attn import ops
from flash_tt_attn.kernels.backward import sum_row_splits_kernel
from flash_tt_attn.kernels.common import exp2, prescale, scores, settle


@triton.jit
def dkdv_dbias_kernel(Q, K, V, BIAS, DOUT, LSE, DELTA, DK, DV, PARTIAL, stride_bj, stride_bk, L, rows_per_group,
                      scale, Q_PRESCALED: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                      HEAD_DIM: tl.constexpr, LOOP_STAGES: tl.constexpr, FAST_EXP2: tl.constexpr,
                      SETTLE: tl.constexpr):
    k_block = tl.program_id(0)
    group = tl.program_id(1)
    bh = tl.program_id(2)
    scale = tl.cast(scale, tl.float32)
    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    bias_base = BIAS + bh.to(tl.int64) * L * L + offs_k[:, None] * stride_bk
    partial_block = PARTIAL + (group * tl.num_programs(2) + bh).to(tl.int64) * L * L  # this group's (k, j) sums
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, L)
    for i in range(row_start, row_end):
        row_base = (bh.to(tl.int64) * L + i) * L  # row (b, h, i) in the (B·H·L·L, D) views and the lse
        kv_offsets = (row_base + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
        k_tile = prescale(tl.load(K + kv_offsets), scale, Q_PRESCALED)
        v_tile = tl.load(V + kv_offsets)
        dk = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
        for j_start in tl.range(0, L, BLOCK_J, num_stages=LOOP_STAGES):
            offs_j = j_start + tl.arange(0, BLOCK_J)
            qdo_offsets = (row_base + offs_j[:, None]) * HEAD_DIM + offs_d[None, :]
            q_tile = tl.load(Q + qdo_offsets)
            do_tile = tl.load(DOUT + qdo_offsets)
            lse = tl.load(LSE + row_base + offs_j)
            delta = tl.load(DELTA + row_base + offs_j)
            bias_t = tl.load(bias_base + offs_j[None, :] * stride_bj).to(tl.float32)
            st = scores(k_tile, tl.trans(q_tile), bias_t, scale, Q_PRESCALED, tl.float32, "tf32")
            pt = exp2(st * 1.4426950408889634 - lse[None, :], FAST_EXP2)
            dv += tl.dot(pt.to(do_tile.dtype), do_tile, out_dtype=tl.float32)
            dpt = tl.dot(v_tile, tl.trans(do_tile), out_dtype=tl.float32)
            dst = pt * (dpt - delta[None, :])
            dk = settle(dk + tl.dot(dst.to(q_tile.dtype), q_tile, out_dtype=tl.float32), SETTLE)
            tl.atomic_add(partial_block + (offs_k[:, None] * L + offs_j[None, :]), dst, sem="relaxed")
        tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty))


def dkdv_dbias(q, k, v, bias, lse, delta, dout, scale, splits):
    """(dk, dv, dbias) for contiguous (B, H, L, L, D) inputs, delta from the library's dq kernel; the rows are
    split into `splits` groups, one fp32 partial sum each."""
    B, H, L, _, D = q.shape
    cfg = ops.dkdv_config(L, D, q.dtype, q.device)
    assert cfg.rows == 1 and L % cfg.block_j == 0 and L % cfg.block_k == 0
    assert all(t.is_contiguous() for t in (q, k, v, dout, lse, delta))
    bias_tiles = bias.mT.contiguous().mT if cfg.key_major_bias else bias
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    partial = torch.zeros((splits, B, H, L, L), dtype=torch.float32, device=q.device)
    rows_per_group = ops.cdiv(L, splits)
    groups = ops.cdiv(L, rows_per_group)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.max_registers is not None:
        options["maxnreg"] = cfg.max_registers
    dkdv_dbias_kernel[(L // cfg.block_k, groups, B * H)](
        q, k, v, bias_tiles, dout, lse, delta, dk, dv, partial, bias_tiles.stride(2), bias_tiles.stride(3),
        L, rows_per_group, scale, Q_PRESCALED=ops._q_prescaled(q.dtype, scale) and cfg.prescale,
        BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k, HEAD_DIM=D, LOOP_STAGES=cfg.loop_stages,
        FAST_EXP2=ops._fast_exp2(q.dtype, q.device), SETTLE=ops._settle(q.dtype, q.device, cfg), **options)
    dbias_key_major = torch.empty((B, H, L, L), dtype=bias.dtype, device=q.device)
    n = dbias_key_major.numel()
    sum_row_splits_kernel[(ops.cdiv(n, ops.SUM_BLOCK),)](partial[:groups], dbias_key_major, n, groups,
                                                         ACC_DTYPE=tl.float32, BLOCK=ops.SUM_BLOCK)
    return dk, dv, dbias_key_major.mT.contiguous()

