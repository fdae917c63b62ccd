"""Forward kernel: one program per (block of queries j, pair of rows i, batch·head).

For each row i the problem is ordinary attention of L queries over L keys, plus a
bias tile bias[b, h, j-block, k-block] that is the same for every i. At D = 32 per
score a program reads 2 bytes of bias but only 4·D/BLOCK_J bytes of k and v (DRAM is not
the limit; PERF.md: the kernels are latency-bound). So each program handles ROWS rows i (1, 2 or 4),
loads each bias tile once for all of them, and gives the scheduler ROWS independent
chains of matrix products and exponentials to interleave.

Programs are numbered with the query block fastest: the blocks of one row run
together and read k_i and v_i from DRAM once; the bias of one (b, h) stays in L2 while
its rows are in flight. q is scaled once per program (unless that could overflow fp16) and the bias tile is the
accumulator of the q·kᵀ product; log2(e) is folded into the softmax's exponent (one
FMA per score), so the softmax needs only exp2. With LOOP_STAGES set, the key loop
pipelines the bias tile too (Triton alone pipelines only the products' operands);
ROW_OFFSET_DTYPE is int32 when the offsets inside a row fit.

With HAS_EXTENTS, EXTENTS holds per batch item two counts (B, 2), int32: the rows i of this call that are
real residues, and the real columns (keys and queries; the rest is a padded tail). A program visits keys
only up to the real columns, none when its first row or its whole query block is padding; padded queries
store 0 and lse = +inf, so the backward sees p = 0 there. EVEN_L (L divides the tiles) keeps the unmasked loads
of q, k and the bias with a padded tail too, since every tile lies inside L: the keys past the real length are
dropped by a select on the scores, and v is loaded masked there (0, not whatever the padding holds, meets their
p = 0). Without EVEN_L the bias tile, contiguous along keys, is loaded
with keys bounded by L, not by the real columns, and the scores then drop the padded keys: Triton knows L's
divisibility by 16 (it specializes on it), not that of a count loaded from EXTENTS, so a mask at the real
columns would split every bias load into 2-byte loads (at 50ea279 a padded batch took 1.07–1.12× the time of
the unpadded one instead of ~0.6×; H200, spec long-inference).
"""

import triton
import triton.language as tl

from .common import LOG2E, exp2, prescale, scores


@triton.jit
def _row_scores(q, kt_ptrs, bias, mask_ptrs, k_in, row_ok, scale, select_keys,
                ROW_MAY_BE_OUT: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_L: tl.constexpr,
                HAS_EXTENTS: tl.constexpr, END_TILE_SELECT: tl.constexpr, Q_PRESCALED: tl.constexpr,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of one row: the natural-log scores scale·q·k + bias (-inf where a key is excluded),
    and the row's admitted keys.

    row_ok is a [BLOCK_K] block, all True or all False (is this row inside the tensor?);
    it is read only when ROW_MAY_BE_OUT. With EVEN_L and a padded tail, k is loaded unmasked (the tile lies
    inside L) and the keys past the real length are dropped from the scores. With END_TILE_SELECT (and no
    mask) they are dropped only where select_keys (a scalar: the key block reaches past the real length or L,
    or the row has no keys): a real row's tile wholly inside skips the select, one branch per tile instead of a
    select per score.
    """
    if ROW_MAY_BE_OUT:
        k_in = k_in & row_ok
    if EVEN_L and not ROW_MAY_BE_OUT:
        kt = tl.load(kt_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=k_in[None, :], other=0.0)
    s = scores(q, kt, bias, scale, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
    if HAS_MASK:
        keep = tl.load(mask_ptrs, mask=k_in, other=0) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    elif not EVEN_L or HAS_EXTENTS:
        if END_TILE_SELECT:
            if select_keys:
                s = tl.where(k_in[None, :], s, float("-inf"))
        else:
            s = tl.where(k_in[None, :], s, float("-inf"))
    return s, k_in


@triton.jit
def _online_softmax_update(s, v_ptrs, m_i, l_i, acc, k_in, LOAD_MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, FAST_EXP2: tl.constexpr):
    """The running max and sum and the output accumulator of one row, after its scores s of one key block."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no admitted key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
    p = exp2(s * LOG2E - m_shift[:, None], FAST_EXP2)
    alpha = exp2(m_i * LOG2E - m_shift, FAST_EXP2)
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOAD_MASKED:
        v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
    else:
        v_tile = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION,
                                        out_dtype=ACC_DTYPE)
    return m_new, l_i, acc


@triton.jit
def _start_row(q_base, q_rel, row, stride_qi, R, key_rows, scale, offs_j, j_in, BLOCK_J: tl.constexpr,
               BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, Q_PRESCALED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Scaled q and empty softmax state of a row that may lie past the last row R - 1 (ok_j: stored),
    or past the last row with keys, key_rows - 1 (ok_k: its keys are admitted)."""
    ok_j = (offs_j * 0 + row) < R
    ok_k = (tl.arange(0, BLOCK_K) * 0 + row) < key_rows
    q = tl.load(q_base + row * stride_qi + q_rel, mask=j_in[:, None] & ok_j[:, None], other=0.0)
    q = prescale(q, scale, Q_PRESCALED)
    m = tl.full([BLOCK_J], float("-inf"), dtype=ACC_DTYPE)
    l_sum = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)
    return q, m, l_sum, acc, ok_j, ok_k


@triton.jit
def _drop_padded_queries(l_i, acc, query_real):
    """A row's state with its padded queries emptied: they store 0 and lse = +inf."""
    return tl.where(query_real, l_i, 0.0), tl.where(query_real[:, None], acc, 0.0)


@triton.jit
def _finish_row(m_i, l_i, acc, o_ptrs, lse_ptrs, store_mask, lse_mask, OUT_DTYPE: tl.constexpr):
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    # One reciprocal per row and a multiply per element: `acc / l_safe[:, None]` would divide every element
    # through div.full.f32 and repeat its range fix-ups for each (80 more instructions per program at D=32).
    out = acc * (1.0 / l_safe)[:, None]
    m_final = tl.where(m_i == float("-inf"), 0.0, m_i) * LOG2E
    # Base-2 log-sum-exp of the natural-log scores times log2(e). Fully excluded rows
    # store +inf, so the backward's exp2(s·log2(e) - lse) is 0 there.
    lse = tl.where(has_keys, m_final + tl.log2(l_safe), float("inf"))
    tl.store(o_ptrs, out.to(OUT_DTYPE), mask=store_mask)
    tl.store(lse_ptrs, lse, mask=lse_mask)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, BIAS, MASK, EXTENTS, OUT, LSE,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_ob, stride_oh, stride_oi, stride_oj, stride_od,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_mb, stride_mi, stride_mk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, R, L, scale,
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
    END_TILE_SELECT: tl.constexpr,
    BIAS_PADDED: tl.constexpr,
):
    j_block = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * ROWS
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if ACC_DTYPE == tl.float32:  # as an eager launch passes it, also under torch.compile (common.py)
        scale = tl.cast(scale, tl.float32)

    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    j_in = offs_j < L
    if HAS_EXTENTS:
        real_rows = tl.load(EXTENTS + 2 * b)
        real_cols = tl.load(EXTENTS + 2 * b + 1)
        key_end = tl.where((row0 < real_rows) & (j_block * BLOCK_J < real_cols), real_cols, 0)
        key_rows = tl.minimum(R, real_rows)
    else:
        key_end = L
        key_rows = R
    offs_j64 = offs_j[:, None].to(tl.int64)

    q_rel = offs_j64 * stride_qj + offs_d[None, :] * stride_qd
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = MASK + b * stride_mb
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_j64 * stride_bj

    # Row 0 of the program always exists; rows 1..ROWS-1 may lie past R (masks as blocks over j and k).
    if EVEN_L:
        q0 = tl.load(q_base + row0 * stride_qi + q_rel)
    else:
        q0 = tl.load(q_base + row0 * stride_qi + q_rel, mask=j_in[:, None], other=0.0)
    q0 = prescale(q0, scale, Q_PRESCALED)
    m0 = tl.full([BLOCK_J], float("-inf"), dtype=ACC_DTYPE)
    l0 = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    acc0 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)
    if ROWS >= 2:
        q1, m1, l1, acc1, ok1_j, ok1_k = _start_row(q_base, q_rel, row0 + 1, stride_qi, R, key_rows, scale,
                                                    offs_j, j_in, BLOCK_J, BLOCK_K, HEAD_DIM, Q_PRESCALED, ACC_DTYPE)
    if ROWS >= 4:
        q2, m2, l2, acc2, ok2_j, ok2_k = _start_row(q_base, q_rel, row0 + 2, stride_qi, R, key_rows, scale,
                                                    offs_j, j_in, BLOCK_J, BLOCK_K, HEAD_DIM, Q_PRESCALED, ACC_DTYPE)
        q3, m3, l3, acc3, ok3_j, ok3_k = _start_row(q_base, q_rel, row0 + 3, stride_qi, R, key_rows, scale,
                                                    offs_j, j_in, BLOCK_J, BLOCK_K, HEAD_DIM, Q_PRESCALED, ACC_DTYPE)

    for k_start in tl.range(0, key_end, BLOCK_K, num_stages=LOOP_STAGES):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < key_end
        tile_ends_early = k_start + BLOCK_K > key_end
        kt_rel = offs_k[None, :].to(ROW_OFFSET_DTYPE) * stride_kk + offs_d[:, None] * stride_kd
        v_rel = offs_k[:, None].to(ROW_OFFSET_DTYPE) * stride_vk + offs_d[None, :] * stride_vd
        mask_rel = offs_k * stride_mk
        bias_ptrs = bias_base + offs_k[None, :] * stride_bk
        if EVEN_L or BIAS_PADDED:  # BIAS_PADDED: the bias holds whole tiles (KernelOptions.pad_bias_tiles)
            bias = tl.load(bias_ptrs).to(ACC_DTYPE)
        else:
            # Bounded by L, not by key_end: see the module docstring.
            bias = tl.load(bias_ptrs, mask=j_in[:, None] & (offs_k < L)[None, :], other=0.0).to(ACC_DTYPE)
        # Every row's q·kᵀ product first, then every row's softmax: the rows' exponentials and reductions
        # are then independent work in one stretch of code, which the compiler interleaves.
        s0, kin0 = _row_scores(q0, k_base + row0 * stride_ki + kt_rel, bias, mask_base + row0 * stride_mi + mask_rel,
                               k_in, k_in, scale, tile_ends_early, False, HAS_MASK, EVEN_L, HAS_EXTENTS,
                               END_TILE_SELECT, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
        if ROWS >= 2:
            s1, kin1 = _row_scores(q1, k_base + (row0 + 1) * stride_ki + kt_rel, bias,
                                   mask_base + (row0 + 1) * stride_mi + mask_rel, k_in, ok1_k, scale,
                                   tile_ends_early | (row0 + 1 >= key_rows), True, HAS_MASK, EVEN_L, HAS_EXTENTS,
                                   END_TILE_SELECT, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
        if ROWS >= 4:
            s2, kin2 = _row_scores(q2, k_base + (row0 + 2) * stride_ki + kt_rel, bias,
                                   mask_base + (row0 + 2) * stride_mi + mask_rel, k_in, ok2_k, scale,
                                   tile_ends_early | (row0 + 2 >= key_rows), True, HAS_MASK, EVEN_L, HAS_EXTENTS,
                                   END_TILE_SELECT, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
            s3, kin3 = _row_scores(q3, k_base + (row0 + 3) * stride_ki + kt_rel, bias,
                                   mask_base + (row0 + 3) * stride_mi + mask_rel, k_in, ok3_k, scale,
                                   tile_ends_early | (row0 + 3 >= key_rows), True, HAS_MASK, EVEN_L, HAS_EXTENTS,
                                   END_TILE_SELECT, Q_PRESCALED, ACC_DTYPE, DOT_PRECISION)
        m0, l0, acc0 = _online_softmax_update(s0, v_base + row0 * stride_vi + v_rel, m0, l0, acc0, kin0,
                                              not EVEN_L or HAS_EXTENTS, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)
        if ROWS >= 2:
            m1, l1, acc1 = _online_softmax_update(s1, v_base + (row0 + 1) * stride_vi + v_rel, m1, l1, acc1,
                                                  kin1, True, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)
        if ROWS >= 4:
            m2, l2, acc2 = _online_softmax_update(s2, v_base + (row0 + 2) * stride_vi + v_rel, m2, l2, acc2,
                                                  kin2, True, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)
            m3, l3, acc3 = _online_softmax_update(s3, v_base + (row0 + 3) * stride_vi + v_rel, m3, l3, acc3,
                                                  kin3, True, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)

    if HAS_EXTENTS:
        query_real = offs_j < real_cols
        l0, acc0 = _drop_padded_queries(l0, acc0, query_real)
        if ROWS >= 2:
            l1, acc1 = _drop_padded_queries(l1, acc1, query_real)
        if ROWS >= 4:
            l2, acc2 = _drop_padded_queries(l2, acc2, query_real)
            l3, acc3 = _drop_padded_queries(l3, acc3, query_real)
    o_rel = offs_j64 * stride_oj + offs_d[None, :] * stride_od
    o_base = OUT + b * stride_ob + h * stride_oh
    lse_base = LSE + b * stride_lb + h * stride_lh + offs_j.to(tl.int64) * stride_lj
    _finish_row(m0, l0, acc0, o_base + row0 * stride_oi + o_rel, lse_base + row0 * stride_li,
                j_in[:, None], j_in, OUT.dtype.element_ty)
    if ROWS >= 2:
        _finish_row(m1, l1, acc1, o_base + (row0 + 1) * stride_oi + o_rel, lse_base + (row0 + 1) * stride_li,
                    j_in[:, None] & ok1_j[:, None], j_in & ok1_j, OUT.dtype.element_ty)
    if ROWS >= 4:
        _finish_row(m2, l2, acc2, o_base + (row0 + 2) * stride_oi + o_rel, lse_base + (row0 + 2) * stride_li,
                    j_in[:, None] & ok2_j[:, None], j_in & ok2_j, OUT.dtype.element_ty)
        _finish_row(m3, l3, acc3, o_base + (row0 + 3) * stride_oi + o_rel, lse_base + (row0 + 3) * stride_li,
                    j_in[:, None] & ok3_j[:, None], j_in & ok3_j, OUT.dtype.element_ty)
