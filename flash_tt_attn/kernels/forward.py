"""Forward kernel: one program per (row i, block of queries j, batch·head).

For each row i the problem is ordinary attention of L queries over L keys, plus a
bias tile bias[b, h, j-block, k-block] that is the same for every i. Programs are
numbered with the query block fastest: the blocks of one row run together and read
k_i and v_i from DRAM once; the bias of one (b, h) (L² values) stays in L2 while all
rows of that (b, h) are in flight. log2(e) is folded into the
softmax's exponent (one FMA per score) so it needs only exp2; q is scaled once per
program and the bias tile is the accumulator of the q·kᵀ product, so a score costs no
extra arithmetic before its max and exponential.
"""

import triton
import triton.language as tl

@triton.jit
def attention_fwd_kernel(
    Q, K, V, BIAS, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qi, stride_qj, stride_qd,
    stride_kb, stride_kh, stride_ki, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vi, stride_vk, stride_vd,
    stride_ob, stride_oh, stride_oi, stride_oj, stride_od,
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
):
    # Query blocks of one row are neighbours in launch order, so they share k_i, v_i in L2.
    j_block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    j_in = offs_j < L

    q_ptrs = Q + b * stride_qb + h * stride_qh + row * stride_qi \
        + offs_j[:, None].to(tl.int64) * stride_qj + offs_d[None, :] * stride_qd
    if EVEN_L:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=j_in[:, None], other=0.0)
    # Scale q once, so each score is one matrix product accumulated onto the bias tile.
    q = (q * scale).to(q.dtype)

    k_base = K + b * stride_kb + h * stride_kh + row * stride_ki
    v_base = V + b * stride_vb + h * stride_vh + row * stride_vi
    bias_base = BIAS + b * stride_bb + h * stride_bh + offs_j[:, None].to(tl.int64) * stride_bj
    mask_base = MASK + b * stride_mb + row * stride_mi

    m_i = tl.full([BLOCK_J], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_J, HEAD_DIM], dtype=ACC_DTYPE)

    for k_start in range(0, L, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_in = offs_k < L
        kt_ptrs = k_base + offs_k[None, :].to(tl.int64) * stride_kk + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_k[:, None].to(tl.int64) * stride_vk + offs_d[None, :] * stride_vd
        bias_ptrs = bias_base + offs_k[None, :] * stride_bk
        if EVEN_L:
            kt = tl.load(kt_ptrs)
            bias = tl.load(bias_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=k_in[None, :], other=0.0)
            bias = tl.load(bias_ptrs, mask=j_in[:, None] & k_in[None, :], other=0.0)
        # Natural-log scores: scale·q·k + bias, the bias entering as the product's accumulator.
        s = tl.dot(q, kt, acc=bias.to(ACC_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_MASK:
            keep = tl.load(mask_base + offs_k * stride_mk, mask=k_in, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        elif not EVEN_L:
            s = tl.where(k_in[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no admitted key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) * 1.4426950408889634
        p = tl.exp2(s * 1.4426950408889634 - m_shift[:, None])
        alpha = tl.exp2(m_i * 1.4426950408889634 - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EVEN_L:
            v_tile = tl.load(v_ptrs)
        else:
            v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION,
                                            out_dtype=ACC_DTYPE)
        m_i = m_new

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    m_final = tl.where(m_i == float("-inf"), 0.0, m_i) * 1.4426950408889634
    # Base-2 log-sum-exp of the natural-log scores times log2(e). Fully excluded rows
    # store +inf, so the backward's exp2(s·log2(e) - lse) is 0 there.
    lse = tl.where(has_keys, m_final + tl.log2(l_safe), float("inf"))

    o_ptrs = OUT + b * stride_ob + h * stride_oh + row * stride_oi \
        + offs_j[:, None].to(tl.int64) * stride_oj + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=j_in[:, None])
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + row * stride_li + offs_j.to(tl.int64) * stride_lj
    tl.store(lse_ptrs, lse, mask=j_in)
