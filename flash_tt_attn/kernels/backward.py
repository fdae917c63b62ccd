"""Backward kernels. Scores are recomputed from q, k, bias and the saved base-2
log-sum-exp, never stored. Three kernels, none with atomics, so every gradient is
bitwise reproducible:

* ``attention_bwd_dq_kernel``: program per (query block j, ROWS rows i); loops over
  keys; writes dq and delta = rowsum(dO · O) (used by the two kernels that follow), and
  with ``COPY_BIAS`` the key-major copy of the bias that dk/dv reads (one launch fewer).
* ``attention_bwd_dkdv_kernel``: program per (key block k, ROWS rows i); loops over
  queries; writes dk and dv.

  With ROWS = 2 a program loads each bias tile once for two rows and interleaves their
  independent work; the second row may lie past the last one (odd R) and is masked.
* ``attention_bwd_dbias_kernel``: program per ((query block j, key block k), split of
  rows i); loops over its rows with the bias tile and the dbias accumulator held in
  registers; writes one partial sum per split, which ``sum_row_splits_kernel`` adds
  up in a fixed order when there is more than one split (or, with ``SUM_SPLITS``, the
  dk/dv kernel's programs before their own work: one launch fewer, the same sums).

Conventions shared with the forward: the scale goes into one operand once, in its own
dtype (q in dq, the loop-invariant k block in dk/dv, whose dk takes the scale at the
end), unless that could overflow fp16 (``Q_PRESCALED`` false: the scale then multiplies
the fp32 product); the bias tile is the accumulator of the q·kᵀ product (natural-log
scores s), and p = exp2(s·log2(e) − lse) with lse in base 2. The bias gradient, whose
q and k both change every iteration, scales neither: with ``UNSCALED_SCORES`` (any
nonzero scale) its accumulator is bias/scale and the scale joins log2(e) in exp2's FMA.
dq and dk/dv pass their accumulating product through ``settle`` (common.py) when
``SETTLE``: without it ptxas serializes every wgmma of those kernels. ``EVEN_L``
(L a multiple of both blocks) drops every bounds mask. ``LOOP_STAGES`` (None or the
launch's num_stages) and ``ROW_OFFSET_DTYPE`` (int32 or int64) are explained in ops.py.

With ``HAS_EXTENTS`` (a padded tail, see forward.py: per batch item the real rows of this call and the real
columns), each kernel visits only the tiles that hold a real (row, key, query): dq only the real keys of
real rows and query blocks, dk/dv only the real queries of real rows and key blocks, the bias gradient only
the real rows of its tile when the tile holds a real query and key. Padded queries carry lse = +inf from the
forward (p = 0) and O = 0 (delta = 0); what is skipped would have added exact zeros.
"""

import triton
import triton.language as tl

from .common import LOG2E, exp2, prescale, scores, settle


@triton.jit
def _dq_row_start(q_ptrs, do_ptrs, o_ptrs, lse_ptrs, delta_ptrs, scale, j_in,
                  LOAD_MASKED: tl.constexpr, Q_PRESCALED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Loads one row's q (prescaled if Q_PRESCALED), dO and lse; computes and stores delta = rowsum(dO·O)."""
    if LOAD_MASKED:
        q = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=j_in[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=j_in[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=j_in, other=float("inf"))
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        o = tl.load(o_ptrs)
        lse = tl.load(lse_ptrs)
    q = prescale(q, scale, Q_PRESCALED)
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), 1)
    tl.store(delta_ptrs, delta, mask=j_in)
    return q, do, lse, delta


@triton.jit
def _dq_row_step(q, do, lse, delta, k_ptrs, vt_ptrs, mask_ptrs, bias, dq, k_in, scale,
                 LOAD_MASKED: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_L: tl.constexpr, Q_PRESCALED: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_EXP2: tl.constexpr,
                 SETTLE: tl.constexpr):
    """One key block of one row: recompute p, then dq += (p ∘ (dO·vᵀ − delta)) · k."""
    if LOAD_MASKED:
        k_tile = tl.load(k_ptrs, mask=k_in[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=k_in[None, :], other=0.0)
    else:
        k_tile = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    s = scores(q, tl.trans(k_tile), bias, scale, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
    p = exp2(s * LOG2E - lse[:, None], FAST_EXP2)
    if HAS_MASK:
        keep = tl.load(mask_ptrs, mask=k_in, other=0) != 0
        p = tl.where(keep[None, :], p, 0.0)
    elif not EVEN_L:
        p = tl.where(k_in[None, :], p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    return settle(dq + tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE),
                  SETTLE)


@triton.jit
def _flat_program():
    """This program's index over the whole 3-D grid, and the grid's size: for work shared out round-robin."""
    program = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    return program, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)


@triton.jit
def _copy_bias_tile(BIAS, COPY, tile, tiles_j, tiles_k, H, width, stride_bb, stride_bh, stride_bj, stride_bk,
                    stride_cb, stride_ch, stride_cj, stride_ck, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_J, BLOCK_K) tile of the (B, H, width, width) bias into COPY (another layout, the same values);
    tiles are numbered over (b·H + h, j block, k block)."""
    bh = tile // (tiles_j * tiles_k)
    j_block = tile % (tiles_j * tiles_k) // tiles_k
    k_block = tile % tiles_k
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (offs_j < width)[:, None] & (offs_k < width)[None, :]
    offs_j64 = offs_j[:, None].to(tl.int64)
    offs_k64 = offs_k[None, :].to(tl.int64)
    values = tl.load(BIAS + b * stride_bb + h * stride_bh + offs_j64 * stride_bj + offs_k64 * stride_bk, mask=inside)
    tl.store(COPY + b * stride_cb + h * stride_ch + offs_j64 * stride_cj + offs_k64 * stride_ck, values, mask=inside)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, BIAS, MASK, EXTENTS, OUT, DOUT, LSE, DELTA, DQ, BIAS_COPY,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_dqb, stride_dqh, stride_dqi, stride_dqj, stride_dqd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_ob, stride_oh, stride_oi, stride_oj, stride_od,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    stride_cb, stride_ch, stride_cj, stride_ck,
    H, R, L, scale, copy_width,
    HAS_MASK: tl.constexpr,
    HAS_EXTENTS: tl.constexpr,
    EVEN_L: tl.constexpr,
    Q_PRESCALED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    ROW_OFFSET_DTYPE: tl.constexpr,
    SETTLE: tl.constexpr,
    BIAS_PADDED: tl.constexpr,
    COPY_BIAS: tl.constexpr,
):
    if COPY_BIAS:
        # dk/dv's key-major copy of the bias this kernel reads (KernelOptions.fold_bias_copy), first, while few
        # registers are live: the programs share its tiles out round-robin, whatever tiles their own loops
        # skip (a padded tail, a mask), and dk/dv runs after this kernel on the stream.
        program, programs = _flat_program()
        copy_tiles_j = tl.cdiv(copy_width, BLOCK_J)
        copy_tiles_k = tl.cdiv(copy_width, BLOCK_K)
        for tile in tl.range(program, tl.num_programs(2) * copy_tiles_j * copy_tiles_k, programs):
            _copy_bias_tile(BIAS, BIAS_COPY, tile, copy_tiles_j, copy_tiles_k, H, copy_width,
                            stride_bb, stride_bh, stride_bj, stride_bk, stride_cb, stride_ch, stride_cj, stride_ck,
                            BLOCK_J, BLOCK_K)

    j_block = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * ROWS
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if ACC_DTYPE == tl.float32:  # as an eager launch passes it, also under torch.compile (common.py)
        scale = tl.cast(scale, tl.float32)
    row1 = row0 + 1

    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    j_in = offs_j < L
    offs_j64 = offs_j[:, None].to(tl.int64)
    if HAS_EXTENTS:
        real_rows = tl.load(EXTENTS + 2 * b)
        real_cols = tl.load(EXTENTS + 2 * b + 1)
        key_end = tl.where((row0 < real_rows) & (j_block * BLOCK_J < real_cols), real_cols, 0)
        key_rows = tl.minimum(R, real_rows)
    else:
        key_end = L
        key_rows = R

    q_base = Q + b * stride_qb + h * stride_qh + offs_j64 * stride_qj + offs_d[None, :] * stride_qd
    do_base = DOUT + b * stride_dob + h * stride_doh + offs_j64 * stride_doj + offs_d[None, :] * stride_dod
    o_base = OUT + b * stride_ob + h * stride_oh + offs_j64 * stride_oj + offs_d[None, :] * stride_od
    lse_base = b * stride_lb + h * stride_lh + offs_j.to(tl.int64) * stride_lj
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_j64 * stride_bj
    mask_base = MASK + b * stride_mb

    q0, do0, lse0, delta0 = _dq_row_start(
        q_base + row0 * stride_qi, do_base + row0 * stride_doi, o_base + row0 * stride_oi,
        LSE + lse_base + row0 * stride_li, DELTA + lse_base + row0 * stride_li, scale, j_in,
        not EVEN_L, Q_PRESCALED, ACC_DTYPE)
    dq0 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)
    if ROWS == 2:
        # The second row may lie past R: treat its queries as out of range (p = 0, nothing stored).
        j_in1 = j_in & ((offs_j * 0 + row1) < R)
        k_in1_row = (tl.arange(0, BLOCK_K) * 0 + row1) < key_rows
        q1, do1, lse1, delta1 = _dq_row_start(
            q_base + row1 * stride_qi, do_base + row1 * stride_doi, o_base + row1 * stride_oi,
            LSE + lse_base + row1 * stride_li, DELTA + lse_base + row1 * stride_li, scale, j_in1,
            True, Q_PRESCALED, ACC_DTYPE)
        dq1 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)

    for k_start in tl.range(0, key_end, BLOCK_K, num_stages=LOOP_STAGES):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < key_end
        k_rel = offs_k[:, None].to(ROW_OFFSET_DTYPE) * stride_kk + offs_d[None, :] * stride_kd
        vt_rel = offs_k[None, :].to(ROW_OFFSET_DTYPE) * stride_vk + offs_d[:, None] * stride_vd
        bias_ptrs = bias_base + offs_k[None, :] * stride_bk
        if EVEN_L or BIAS_PADDED:  # BIAS_PADDED: zeros past L to whole tiles (KernelOptions.pad_bias_tiles_backward)
            bias = tl.load(bias_ptrs).to(ACC_DTYPE)
        else:
            # Bounded by L, not by key_end, as in the forward (forward.py's module docstring says why).
            bias = tl.load(bias_ptrs, mask=j_in[:, None] & (offs_k < L)[None, :], other=0.0).to(ACC_DTYPE)
        dq0 = _dq_row_step(q0, do0, lse0, delta0, k_base + row0 * stride_ki + k_rel,
                           v_base + row0 * stride_vi + vt_rel, mask_base + row0 * stride_mi + offs_k * stride_mk,
                           bias, dq0, k_in, scale, not EVEN_L, HAS_MASK, EVEN_L, Q_PRESCALED, ACC_DTYPE,
                           DOT_PRECISION, FAST_EXP2, SETTLE)
        if ROWS == 2:
            dq1 = _dq_row_step(q1, do1, lse1, delta1, k_base + row1 * stride_ki + k_rel,
                               v_base + row1 * stride_vi + vt_rel, mask_base + row1 * stride_mi + offs_k * stride_mk,
                               bias, dq1, k_in & k_in1_row, scale, True, HAS_MASK, EVEN_L, Q_PRESCALED, ACC_DTYPE,
                               DOT_PRECISION, FAST_EXP2, SETTLE)

    dq_base = DQ + b * stride_dqb + h * stride_dqh + offs_j64 * stride_dqj + offs_d[None, :] * stride_dqd
    tl.store(dq_base + row0 * stride_dqi, (dq0 * scale).to(DQ.dtype.element_ty), mask=j_in[:, None])
    if ROWS == 2:
        tl.store(dq_base + row1 * stride_dqi, (dq1 * scale).to(DQ.dtype.element_ty), mask=j_in1[:, None])


@triton.jit
def _dkdv_row_step(k_tile, v_tile, keep, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, bias_t, dk, dv, j_in, scale,
                   LOAD_MASKED: tl.constexpr, APPLY_KEEP: tl.constexpr, Q_PRESCALED: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_EXP2: tl.constexpr,
                   SETTLE: tl.constexpr):
    """One query block of one row, transposed (rows are keys): dv += pᵀ·dO, dk += dsᵀ·q.

    k_tile arrives prescaled (k·scale) when Q_PRESCALED, so q tiles are used as loaded: scaling them here
    would send every q tile through registers and back to shared memory. dk then lacks the scale, which
    the caller applies once at the end."""
    if LOAD_MASKED:
        q_tile = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
        do_tile = tl.load(do_ptrs, mask=j_in[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=j_in, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=j_in, other=0.0)
    else:
        q_tile = tl.load(q_ptrs)
        do_tile = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    st = scores(k_tile, tl.trans(q_tile), bias_t, scale, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
    pt = exp2(st * LOG2E - lse[None, :], FAST_EXP2)
    if APPLY_KEEP:
        pt = tl.where(keep[:, None], pt, 0.0)
    dv += tl.dot(pt.to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dpt = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dst = pt * (dpt - delta[None, :])
    dk = settle(dk + tl.dot(dst.to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE),
                SETTLE)
    return dk, dv


@triton.jit
def _dkdv_row_start(k_ptrs, v_ptrs, mask_ptrs, k_in, scale, LOAD_MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
                    Q_PRESCALED: tl.constexpr):
    """One row's k block (times the scale when Q_PRESCALED: s = (k·scale)·qᵀ + bias), v block and key mask."""
    if LOAD_MASKED:
        k_tile = tl.load(k_ptrs, mask=k_in[:, None], other=0.0)
        v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
    else:
        k_tile = tl.load(k_ptrs)
        v_tile = tl.load(v_ptrs)
    keep = k_in
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptrs, mask=k_in, other=0) != 0)
    return prescale(k_tile, scale, Q_PRESCALED), v_tile, keep


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, BIAS, MASK, EXTENTS, DOUT, LSE, DELTA, DK, DV, DBIAS_PARTIAL, DBIAS,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_dkb, stride_dkh, stride_dki, stride_dkk, stride_dkd,
    stride_dvb, stride_dvh, stride_dvi, stride_dvk, stride_dvd,
    stride_dob, stride_doh, stride_doi, stride_doj, stride_dod,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, R, L, scale, dbias_elements, dbias_splits,
    HAS_MASK: tl.constexpr,
    HAS_EXTENTS: tl.constexpr,
    EVEN_L: tl.constexpr,
    Q_PRESCALED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    ROW_OFFSET_DTYPE: tl.constexpr,
    SETTLE: tl.constexpr,
    BIAS_PADDED: tl.constexpr,
    SUM_SPLITS: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
):
    if SUM_SPLITS:
        # The bias gradient's split sum, folded in (KernelOptions.fold_split_sum), first, while few registers are
        # live: the dbias kernel ran before this one on the stream, and the programs share its blocks out
        # round-robin, so every element still gets sum_row_splits_kernel's fixed-order sum.
        program, programs = _flat_program()
        for block in tl.range(program, tl.cdiv(dbias_elements, SUM_BLOCK), programs):
            _sum_row_splits_block(DBIAS_PARTIAL, DBIAS, block, dbias_elements, dbias_splits, ACC_DTYPE, SUM_BLOCK)

    k_block = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * ROWS
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if ACC_DTYPE == tl.float32:  # as an eager launch passes it, also under torch.compile (common.py)
        scale = tl.cast(scale, tl.float32)
    row1 = row0 + 1

    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    k_in = offs_k < L
    offs_k64 = offs_k[:, None].to(tl.int64)

    if HAS_EXTENTS:
        real_rows = tl.load(EXTENTS + 2 * b)
        real_cols = tl.load(EXTENTS + 2 * b + 1)
        key_real = offs_k < tl.where(row0 < real_rows, real_cols, 0)
        query_end = tl.where((row0 < real_rows) & (k_block * BLOCK_K < real_cols), real_cols, 0)
        key_rows = tl.minimum(R, real_rows)
    else:
        key_real = k_in
        query_end = L
        key_rows = R

    k_base = K + b * stride_kb + h * stride_kh + offs_k64 * stride_kk + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + offs_k64 * stride_vk + offs_d[None, :] * stride_vd
    mask_base = MASK + b * stride_mb + offs_k * stride_mk
    k0, v0, keep0 = _dkdv_row_start(k_base + row0 * stride_ki, v_base + row0 * stride_vi,
                                    mask_base + row0 * stride_mi, key_real, scale, not EVEN_L, HAS_MASK, Q_PRESCALED)
    dk0 = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
    dv0 = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
    if ROWS == 2:
        # The second row may lie past R: its keys count as out of range (p = 0, nothing stored).
        k_in1 = k_in & ((offs_k * 0 + row1) < R)
        j_in1_row = (tl.arange(0, BLOCK_J) * 0 + row1) < R
        k1, v1, keep1 = _dkdv_row_start(k_base + row1 * stride_ki, v_base + row1 * stride_vi,
                                        mask_base + row1 * stride_mi, key_real & ((offs_k * 0 + row1) < key_rows),
                                        scale, True, HAS_MASK, Q_PRESCALED)
        dk1 = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)
        dv1 = tl.zeros([BLOCK_K, HEAD_DIM], dtype=ACC_DTYPE)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOUT + b * stride_dob + h * stride_doh
    lse_base = b * stride_lb + h * stride_lh
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_k64 * stride_bk

    for j_start in tl.range(0, query_end, BLOCK_J, num_stages=LOOP_STAGES):
        offs_j = j_start + tl.arange(0, BLOCK_J)
        j_in = offs_j < L
        q_rel = offs_j[:, None].to(ROW_OFFSET_DTYPE) * stride_qj + offs_d[None, :] * stride_qd
        do_rel = offs_j[:, None].to(ROW_OFFSET_DTYPE) * stride_doj + offs_d[None, :] * stride_dod
        lse_rel = lse_base + offs_j * stride_lj
        bias_ptrs = bias_base + offs_j[None, :] * stride_bj
        if EVEN_L or BIAS_PADDED:  # BIAS_PADDED: zeros past L to whole tiles (KernelOptions.pad_bias_tiles_backward)
            bias_t = tl.load(bias_ptrs).to(ACC_DTYPE)
        else:
            bias_t = tl.load(bias_ptrs, mask=k_in[:, None] & j_in[None, :], other=0.0).to(ACC_DTYPE)
        dk0, dv0 = _dkdv_row_step(k0, v0, keep0, q_base + row0 * stride_qi + q_rel,
                                  do_base + row0 * stride_doi + do_rel, LSE + lse_rel + row0 * stride_li,
                                  DELTA + lse_rel + row0 * stride_li, bias_t,
                                  dk0, dv0, j_in, scale, not EVEN_L, HAS_MASK or not EVEN_L, Q_PRESCALED,
                                  ACC_DTYPE, DOT_PRECISION, FAST_EXP2, SETTLE)
        if ROWS == 2:
            dk1, dv1 = _dkdv_row_step(k1, v1, keep1, q_base + row1 * stride_qi + q_rel,
                                      do_base + row1 * stride_doi + do_rel, LSE + lse_rel + row1 * stride_li,
                                      DELTA + lse_rel + row1 * stride_li, bias_t, dk1, dv1, j_in & j_in1_row, scale,
                                      True, True, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION, FAST_EXP2, SETTLE)

    dk_base = DK + b * stride_dkb + h * stride_dkh + offs_k64 * stride_dkk + offs_d[None, :] * stride_dkd
    dv_base = DV + b * stride_dvb + h * stride_dvh + offs_k64 * stride_dvk + offs_d[None, :] * stride_dvd
    # dk = scale · Σ_j ds[j, k] q[j], with q as loaded (the scale went into k's copy, or onto s).
    dk0 = dk0 * scale
    if ROWS == 2:
        dk1 = dk1 * scale
    tl.store(dk_base + row0 * stride_dki, dk0.to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(dv_base + row0 * stride_dvi, dv0.to(DV.dtype.element_ty), mask=k_in[:, None])
    if ROWS == 2:
        tl.store(dk_base + row1 * stride_dki, dk1.to(DK.dtype.element_ty), mask=k_in1[:, None])
        tl.store(dv_base + row1 * stride_dvi, dv1.to(DV.dtype.element_ty), mask=k_in1[:, None])


@triton.jit
def attention_bwd_dbias_kernel(
    Q, K, V, BIAS, MASK, EXTENTS, DOUT, LSE, DELTA, DBIAS_PARTIAL,
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
    HAS_EXTENTS: tl.constexpr,
    EVEN_L: tl.constexpr,
    Q_PRESCALED: tl.constexpr,
    UNSCALED_SCORES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_EXP2: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    jk_block = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if ACC_DTYPE == tl.float32:  # as an eager launch passes it, also under torch.compile (common.py)
        scale = tl.cast(scale, tl.float32)
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
    if UNSCALED_SCORES:
        # The accumulator of the unscaled q·kᵀ: s = scale·(q·kᵀ + bias/scale), the scale folded into exp2's FMA.
        bias = bias / scale

    if HAS_EXTENTS:
        real_rows = tl.load(EXTENTS + 2 * b)
        real_cols = tl.load(EXTENTS + 2 * b + 1)
        tile_real = (j_block * BLOCK_J < real_cols) & (k_block * BLOCK_K < real_cols)
        row_end = tl.where(tile_real, tl.minimum(R, real_rows), 0)
        key_real = offs_k < real_cols
    else:
        row_end = R
        key_real = k_in

    row_start = split * rows_per_split
    num_rows = tl.minimum(rows_per_split, row_end - row_start)
    dbias = tl.zeros([BLOCK_J, BLOCK_K], dtype=ACC_DTYPE)
    for r in tl.range(0, num_rows, num_stages=LOOP_STAGES):
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
        if UNSCALED_SCORES:
            s_over_scale = tl.dot(q_tile, kt, acc=bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            p = exp2(s_over_scale * (scale * LOG2E) - lse[:, None], FAST_EXP2)
        else:
            s = scores(prescale(q_tile, scale, Q_PRESCALED), kt, bias, scale, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
            p = exp2(s * LOG2E - lse[:, None], FAST_EXP2)
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + row * stride_mi + offs_k * stride_mk, mask=key_real, other=0) != 0
            p = tl.where(keep[None, :], p, 0.0)
        elif not EVEN_L:
            p = tl.where(key_real[None, :], p, 0.0)
        dp = tl.dot(do_tile, vt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dbias += p * (dp - delta[:, None])

    tl.store(DBIAS_PARTIAL + split * stride_ps + b * stride_pb + h * stride_ph + offs_j64 * stride_pj
             + offs_k[None, :] * stride_pk, dbias.to(DBIAS_PARTIAL.dtype.element_ty),
             mask=j_in[:, None] & k_in[None, :])


@triton.jit
def _sum_row_splits_block(PARTIAL, DBIAS, block, n_elements, splits, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """dbias = Σ_s partial[s] in a fixed order (s = 0, 1, …) over one block of BLOCK elements, written in dbias's
    dtype: one pass over the contiguous partial sums instead of a sum and a cast."""
    offs = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_elements
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for s in range(0, splits):
        acc += tl.load(PARTIAL + s * n_elements + offs, mask=in_range, other=0.0).to(ACC_DTYPE)
    tl.store(DBIAS + offs, acc.to(DBIAS.dtype.element_ty), mask=in_range)


@triton.jit
def sum_row_splits_kernel(PARTIAL, DBIAS, n_elements, splits, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The bias gradient's split sum: a program per block of BLOCK elements (:func:`_sum_row_splits_block`)."""
    _sum_row_splits_block(PARTIAL, DBIAS, tl.program_id(0), n_elements, splits, ACC_DTYPE, BLOCK)
