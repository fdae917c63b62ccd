"""Backward kernels. Scores are recomputed from q, k, bias and the saved base-2
log-sum-exp, never stored. Three kernels, none with atomics, so every gradient is
bitwise reproducible:

* ``attention_bwd_dq_kernel``: program per (query block j, row i); loops over keys;
  writes dq and delta = rowsum(dO · O) (used by the two kernels that follow).
* ``attention_bwd_dkdv_kernel``: program per (key block k, row i); loops over queries;
  writes dk and dv.
* ``attention_bwd_dbias_kernel``: program per ((query block j, key block k), split of
  rows i); loops over its rows with the bias tile and the dbias accumulator held in
  registers; writes one partial sum per split, which the caller reduces in a fixed order.

Conventions shared with the forward: q is scaled once (``q·scale`` in q's dtype), the
bias tile is the accumulator of the q·kᵀ product (natural-log scores s), and
p = exp2(s·log2(e) − lse) with lse in base 2. ``EVEN_L`` (L a multiple of both blocks)
drops every bounds mask.
"""

import triton
import triton.language as tl

from .common import exp2


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, BIAS, MASK, OUT, DOUT, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_dqb, stride_dqh, stride_dqi, stride_dqj, stride_dqd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_ob, stride_oh, stride_oi, stride_oj, stride_od,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, L, scale,
    HAS_MASK: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
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

    q_ptrs = Q + b * stride_qb + h * stride_qh + row * stride_qi + offs_j64 * stride_qj + offs_d[None, :] * stride_qd
    do_ptrs = DOUT + b * stride_dob + h * stride_doh + row * stride_doi + offs_j64 * stride_doj \
        + offs_d[None, :] * stride_dod
    o_ptrs = OUT + b * stride_ob + h * stride_oh + row * stride_oi + offs_j64 * stride_oj + offs_d[None, :] * stride_od
    lse_offs = b * stride_lb + h * stride_lh + row * stride_li + offs_j.to(tl.int64) * stride_lj
    if EVEN_L:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        o = tl.load(o_ptrs)
        lse = tl.load(LSE + lse_offs)
    else:
        q = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=j_in[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=j_in[:, None], other=0.0)
        lse = tl.load(LSE + lse_offs, mask=j_in, other=float("inf"))
    q = (q * scale).to(q.dtype)
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), 1)
    tl.store(DELTA + lse_offs, delta, mask=j_in)

    k_base = K + b * stride_kb + h * stride_kh + row * stride_ki
    v_base = V + b * stride_vb + h * stride_vh + row * stride_vi
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_j64 * stride_bj
    mask_base = MASK + b * stride_mb + row * stride_mi

    dq = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)
    for k_start in range(0, L, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < L
        k_ptrs = k_base + offs_k[:, None].to(tl.int64) * stride_kk + offs_d[None, :] * stride_kd
        vt_ptrs = v_base + offs_k[None, :].to(tl.int64) * stride_vk + offs_d[:, None] * stride_vd
        bias_ptrs = bias_base + offs_k[None, :] * stride_bk
        if EVEN_L:
            k_tile = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
            bias = tl.load(bias_ptrs)
        else:
            k_tile = tl.load(k_ptrs, mask=k_in[:, None], other=0.0)
            vt = tl.load(vt_ptrs, mask=k_in[None, :], other=0.0)
            bias = tl.load(bias_ptrs, mask=j_in[:, None] & k_in[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k_tile), acc=bias.to(ACC_DTYPE), input_precision=DOT_PRECISION,
                   out_dtype=ACC_DTYPE)
        p = exp2(s * 1.4426950408889634 - lse[:, None], FAST_EXP2)
        if HAS_MASK:
            keep = tl.load(mask_base + offs_k * stride_mk, mask=k_in, other=0) != 0
            p = tl.where(keep[None, :], p, 0.0)
        elif not EVEN_L:
            p = tl.where(k_in[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + row * stride_dqi + offs_j64 * stride_dqj
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=j_in[:, None])


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, BIAS, MASK, DOUT, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_dkb, stride_dkh, stride_dki, stride_dkk, stride_dkd,
    stride_dvb, stride_dvh, stride_dvi, stride_dvk, stride_dvd,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, L, scale,
    HAS_MASK: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    k_block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    k_in = offs_k < L
    offs_k64 = offs_k[:, None].to(tl.int64)

    k_ptrs = K + b * stride_kb + h * stride_kh + row * stride_ki + offs_k64 * stride_kk + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + row * stride_vi + offs_k64 * stride_vk + offs_d[None, :] * stride_vd
    if EVEN_L:
        k_tile = tl.load(k_ptrs)
        v_tile = tl.load(v_ptrs)
    else:
        k_tile = tl.load(k_ptrs, mask=k_in[:, None], other=0.0)
        v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
    keep = k_in
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * stride_mb + row * stride_mi + offs_k * stride_mk,
                               mask=k_in, other=0) != 0)

    q_base = Q + b * stride_qb + h * stride_qh + row * stride_qi
    do_base = DOUT + b * stride_dob + h * stride_doh + row * stride_doi
    lse_base = b * stride_lb + h * stride_lh + row * stride_li
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_k64 * stride_bk

    dk = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
    for j_start in range(0, L, BLOCK_J):
        offs_j = j_start + tl.arange(0, BLOCK_J)
        j_in = offs_j < L
        q_ptrs = q_base + offs_j[:, None].to(tl.int64) * stride_qj + offs_d[None, :] * stride_qd
        do_ptrs = do_base + offs_j[:, None].to(tl.int64) * stride_doj + offs_d[None, :] * stride_dod
        bias_ptrs = bias_base + offs_j[None, :] * stride_bj
        if EVEN_L:
            q_tile = tl.load(q_ptrs)
            do_tile = tl.load(do_ptrs)
            lse = tl.load(LSE + lse_base + offs_j * stride_lj)
            delta = tl.load(DELTA + lse_base + offs_j * stride_lj)
            bias_t = tl.load(bias_ptrs)
        else:
            q_tile = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
            do_tile = tl.load(do_ptrs, mask=j_in[:, None], other=0.0)
            lse = tl.load(LSE + lse_base + offs_j * stride_lj, mask=j_in, other=float("inf"))
            delta = tl.load(DELTA + lse_base + offs_j * stride_lj, mask=j_in, other=0.0)
            bias_t = tl.load(bias_ptrs, mask=k_in[:, None] & j_in[None, :], other=0.0)
        q_scaled = (q_tile * scale).to(q_tile.dtype)
        # Transposed scores: rows are keys k, columns are queries j.
        st = tl.dot(k_tile, tl.trans(q_scaled), acc=bias_t.to(ACC_DTYPE), input_precision=DOT_PRECISION,
                    out_dtype=ACC_DTYPE)
        pt = exp2(st * 1.4426950408889634 - lse[None, :], FAST_EXP2)
        if HAS_MASK or not EVEN_L:
            pt = tl.where(keep[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dpt = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dst = pt * (dpt - delta[None, :])
        # dk = scale · Σ_j ds[j, k] q[j]: the scaled q carries the scale.
        dk += tl.dot(dst.to(q_scaled.dtype), q_scaled, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    tl.store(DK + b * stride_dkb + h * stride_dkh + row * stride_dki + offs_k64 * stride_dkk
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + row * stride_dvi + offs_k64 * stride_dvk
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


@triton.jit
def attention_bwd_dbias_kernel(
    Q, K, V, BIAS, MASK, DOUT, LSE, DELTA, DBIAS_PARTIAL,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    stride_ps, stride_pb, stride_ph, stride_pj, stride_pk,
    H, R, L, rows_per_split, scale,
    HAS_MASK: tl.constexpr,
    EVEN_L: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
):
    jk_block = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    num_k_blocks = tl.cdiv(L, BLOCK_K)
    j_block = jk_block // num_k_blocks
    k_block = jk_block % num_k_blocks

    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    j_in = offs_j < L
    k_in = offs_k < L
    offs_j64 = offs_j[:, None].to(tl.int64)
    offs_k64 = offs_k[None, :].to(tl.int64)

    bias_ptrs = BIAS + b * stride_bb + h * stride_bh + offs_j64 * stride_bj + offs_k[None, :] * stride_bk
    if EVEN_L:
        bias = tl.load(bias_ptrs).to(ACC_DTYPE)
    else:
        bias = tl.load(bias_ptrs, mask=j_in[:, None] & k_in[None, :], other=0.0).to(ACC_DTYPE)

    row_start = split * rows_per_split
    num_rows = tl.minimum(rows_per_split, R - row_start)
    dbias = tl.zeros([BLOCK_J, BLOCK_K], dtype=ACC_DTYPE)
    for r in range(0, num_rows):
        row = (row_start + r).to(tl.int64)
        q_ptrs = Q + b * stride_qb + h * stride_qh + row * stride_qi + offs_j64 * stride_qj \
            + offs_d[None, :] * stride_qd
        do_ptrs = DOUT + b * stride_dob + h * stride_doh + row * stride_doi + offs_j64 * stride_doj \
            + offs_d[None, :] * stride_dod
        kt_ptrs = K + b * stride_kb + h * stride_kh + row * stride_ki + offs_k64 * stride_kk \
            + offs_d[:, None] * stride_kd
        vt_ptrs = V + b * stride_vb + h * stride_vh + row * stride_vi + offs_k64 * stride_vk \
            + offs_d[:, None] * stride_vd
        lse_offs = b * stride_lb + h * stride_lh + row * stride_li + offs_j.to(tl.int64) * stride_lj
        if EVEN_L:
            q_tile = tl.load(q_ptrs)
            do_tile = tl.load(do_ptrs)
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
            lse = tl.load(LSE + lse_offs)
            delta = tl.load(DELTA + lse_offs)
        else:
            q_tile = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
            do_tile = tl.load(do_ptrs, mask=j_in[:, None], other=0.0)
            kt = tl.load(kt_ptrs, mask=k_in[None, :], other=0.0)
            vt = tl.load(vt_ptrs, mask=k_in[None, :], other=0.0)
            lse = tl.load(LSE + lse_offs, mask=j_in, other=float("inf"))
            delta = tl.load(DELTA + lse_offs, mask=j_in, other=0.0)
        q_scaled = (q_tile * scale).to(q_tile.dtype)
        s = tl.dot(q_scaled, kt, acc=bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p = exp2(s * 1.4426950408889634 - lse[:, None], FAST_EXP2)
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + row * stride_mi + offs_k * stride_mk, mask=k_in, other=0) != 0
            p = tl.where(keep[None, :], p, 0.0)
        elif not EVEN_L:
            p = tl.where(k_in[None, :], p, 0.0)
        dp = tl.dot(do_tile, vt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dbias += p * (dp - delta[:, None])

    tl.store(DBIAS_PARTIAL + split * stride_ps + b * stride_pb + h * stride_ph + offs_j64 * stride_pj
             + offs_k[None, :] * stride_pk, dbias, mask=j_in[:, None] & k_in[None, :])
