"""Backward kernels with dq folded into the dk/dv pass (PERF.md, probe 35).

* ``attention_bwd_delta_kernel``: delta = rowsum(dO · O) in fp32, one program per (query block, row i).
* ``attention_bwd_dkdvdq_kernel``: persistent programs ("slots"), each taking whole rows i in turn. For
  one row it walks the key blocks in order and, inside, the query blocks, as the dk/dv kernel does:
  dk and dv of the key block accumulate in registers, and each step also adds ds·k into that query
  block's dq. dq of the row lives in an fp32 strip (L × D) that belongs to the slot alone, so the
  same program adds into it in a fixed order (key block 0, 1, …): no atomics, reproducible bits. The
  last key block writes dq in its dtype instead of the strip. Five products per score instead of the
  seven of the separate dq and dk/dv kernels, and one exponential instead of two.

Conventions as in backward.py (bias tiles key-major, k prescaled when Q_PRESCALED, ``settle``).
"""

import triton
import triton.language as tl

from .common import exp2, prescale, scores, settle


@triton.jit
def attention_bwd_delta_kernel(
    OUT, DOUT, DELTA,
    stride_ob, stride_oh, stride_oi, stride_oj, stride_od,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, L,
    BLOCK_J: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    j_block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    j_in = offs_j < L
    offs_j64 = offs_j[:, None].to(tl.int64)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + row * stride_oi + offs_j64 * stride_oj
                + offs_d[None, :] * stride_od, mask=j_in[:, None], other=0.0)
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + row * stride_doi + offs_j64 * stride_doj
                 + offs_d[None, :] * stride_dod, mask=j_in[:, None], other=0.0)
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + row * stride_li + offs_j.to(tl.int64) * stride_lj, delta,
             mask=j_in)


@triton.jit
def attention_bwd_dkdvdq_kernel(
    Q, K, V, BIAS, MASK, DOUT, LSE, DELTA, DQ, DK, DV, DQ_STRIPS,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_dqb, stride_dqh, stride_dqi, stride_dqj, stride_dqd,
    stride_dkb, stride_dkh, stride_dki, stride_dkk, stride_dkd,
    stride_dvb, stride_dvh, stride_dvi, stride_dvk, stride_dvd,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, R, L, total_rows, scale,
    HAS_MASK: tl.constexpr,
    EVEN_L: tl.constexpr,
    Q_PRESCALED: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    ROW_OFFSET_DTYPE: tl.constexpr,
    SETTLE: tl.constexpr,
):
    slot = tl.program_id(0)
    slots = tl.num_programs(0)
    if ACC_DTYPE == tl.float32:  # as an eager launch passes it, also under torch.compile (common.py)
        scale = tl.cast(scale, tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)
    strip = DQ_STRIPS + slot.to(tl.int64) * L * HEAD_DIM
    for row_id in range(slot, total_rows, slots):  # total_rows = B·H·R
        bh = row_id // R
        row = (row_id % R).to(tl.int64)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh + row * stride_qi
        do_base = DOUT + b * stride_dob + h * stride_doh + row * stride_doi
        dq_base = DQ + b * stride_dqb + h * stride_dqh + row * stride_dqi
        lse_base = b * stride_lb + h * stride_lh + row * stride_li
        for k_start in range(0, L, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_in = offs_k < L
            offs_k64 = offs_k[:, None].to(tl.int64)
            k_ptrs = K + b * stride_kb + h * stride_kh + row * stride_ki + offs_k64 * stride_kk \
                + offs_d[None, :] * stride_kd
            v_ptrs = V + b * stride_vb + h * stride_vh + row * stride_vi + offs_k64 * stride_vk \
                + offs_d[None, :] * stride_vd
            if EVEN_L:
                k_tile = tl.load(k_ptrs)
                v_tile = tl.load(v_ptrs)
            else:
                k_tile = tl.load(k_ptrs, mask=k_in[:, None], other=0.0)
                v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
            keep = k_in
            if HAS_MASK:
                keep = keep & (tl.load(MASK + b * stride_mb + row * stride_mi + offs_k * stride_mk, mask=k_in,
                                       other=0) != 0)
            k_tile = prescale(k_tile, scale, Q_PRESCALED)
            dk = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
            dv = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
            bias_base = BIAS + b * stride_bb + h * stride_bh + offs_k64 * stride_bk
            # As [1, D] tensors (the interpreter cannot mask with a Python bool).
            not_first = (offs_d[None, :] * 0 + k_start) > 0
            last = (offs_d[None, :] * 0 + k_start + BLOCK_K) >= L
            for j_start in tl.range(0, L, BLOCK_J, num_stages=LOOP_STAGES):
                offs_j = j_start + tl.arange(0, BLOCK_J)
                j_in = offs_j < L
                q_rel = offs_j[:, None].to(ROW_OFFSET_DTYPE) * stride_qj + offs_d[None, :] * stride_qd
                do_rel = offs_j[:, None].to(ROW_OFFSET_DTYPE) * stride_doj + offs_d[None, :] * stride_dod
                lse_offs = lse_base + offs_j * stride_lj
                strip_ptrs = strip + offs_j[:, None] * HEAD_DIM + offs_d[None, :]
                if EVEN_L:
                    bias_t = tl.load(bias_base + offs_j[None, :] * stride_bj).to(ACC_DTYPE)
                    q_tile = tl.load(q_base + q_rel)
                    do_tile = tl.load(do_base + do_rel)
                    lse = tl.load(LSE + lse_offs)
                    delta = tl.load(DELTA + lse_offs)
                else:
                    bias_t = tl.load(bias_base + offs_j[None, :] * stride_bj, mask=k_in[:, None] & j_in[None, :],
                                     other=0.0).to(ACC_DTYPE)
                    q_tile = tl.load(q_base + q_rel, mask=j_in[:, None], other=0.0)
                    do_tile = tl.load(do_base + do_rel, mask=j_in[:, None], other=0.0)
                    lse = tl.load(LSE + lse_offs, mask=j_in, other=float("inf"))
                    delta = tl.load(DELTA + lse_offs, mask=j_in, other=0.0)
                dq_before = tl.load(strip_ptrs, mask=j_in[:, None] & not_first, other=0.0)
                st = scores(k_tile, tl.trans(q_tile), bias_t, scale, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
                pt = exp2(st * 1.4426950408889634 - lse[None, :], FAST_EXP2)
                if HAS_MASK or not EVEN_L:
                    pt = tl.where(keep[:, None], pt, 0.0)
                dv += tl.dot(pt.to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                dpt = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                dst = (pt * (dpt - delta[None, :])).to(q_tile.dtype)
                dk = settle(dk + tl.dot(dst, q_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE), SETTLE)
                dq = tl.dot(tl.trans(dst), k_tile, acc=dq_before, input_precision=DOT_PRECISION,
                            out_dtype=ACC_DTYPE)
                tl.store(strip_ptrs, dq, mask=j_in[:, None] & ~last)
                if not Q_PRESCALED:
                    dq = dq * scale
                tl.store(dq_base + offs_j[:, None].to(tl.int64) * stride_dqj + offs_d[None, :] * stride_dqd,
                         dq.to(DQ.dtype.element_ty), mask=j_in[:, None] & last)
            # The next key block reads back what this one stored, possibly from other threads' stores.
            tl.debug_barrier()
            dk_ptrs = DK + b * stride_dkb + h * stride_dkh + row * stride_dki + offs_k64 * stride_dkk \
                + offs_d[None, :] * stride_dkd
            dv_ptrs = DV + b * stride_dvb + h * stride_dvh + row * stride_dvi + offs_k64 * stride_dvk \
                + offs_d[None, :] * stride_dvd
            tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_in[:, None])
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_in[:, None])
