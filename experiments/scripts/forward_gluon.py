"""Probe 13's forward kernel in Gluon (Triton 3.6's explicit-layout dialect), for Hopper only.

The same program shape as flash_tt_attn's Triton forward (64 queries j of two rows i per program, 64-key
blocks, the bias tile loaded once for both rows), with what Triton's `tl.dot` cannot express: asynchronous
wgmma and explicit waits. Each iteration issues both rows' q·kᵀ, waits for row 0's alone and runs its
softmax while row 1's product is in flight, then issues row 0's P·V and runs row 1's softmax while that
one is in flight. Loads are cp.async into NUM_STAGES shared-memory buffers, PREFETCH tiles ahead. Contiguous
16-bit inputs with L a multiple of 64 only; no mask. A probe, not part of the library: probe 13 measured it
2–6% slower than the Triton forward at 168 registers (PERF.md has why).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _ex2(x):
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _issue_tile(k_bufs0, k_bufs1, v_bufs0, v_bufs1, bias_bufs, stage, k_row0, k_row1, v_row0, v_row1, bias_rows,
                k_start, offs_kv_r, offs_kv_c, offs_b_c, stride_kk, stride_vk, stride_bk):
    kv_rel = (k_start + offs_kv_r)[:, None] * stride_kk + offs_kv_c[None, :]
    vv_rel = (k_start + offs_kv_r)[:, None] * stride_vk + offs_kv_c[None, :]
    async_copy.async_copy_global_to_shared(k_bufs0.index(stage), k_row0 + kv_rel)
    async_copy.async_copy_global_to_shared(k_bufs1.index(stage), k_row1 + kv_rel)
    async_copy.async_copy_global_to_shared(v_bufs0.index(stage), v_row0 + vv_rel)
    async_copy.async_copy_global_to_shared(v_bufs1.index(stage), v_row1 + vv_rel)
    b_rel = (k_start + offs_b_c)[None, :] * stride_bk
    async_copy.async_copy_global_to_shared(bias_bufs.index(stage), bias_rows + b_rel)


@gluon.jit
def _softmax_step(s, m_i, l_i, acc, o_row_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
    p = _ex2(s * LOG2E - m_shift[:, None])
    alpha = _ex2(m_i * LOG2E - m_shift)
    l_i = l_i * alpha + gl.sum(p, 1)
    acc = acc * gl.convert_layout(alpha, o_row_layout)[:, None]
    p = gl.convert_layout(p.to(dtype), p_layout)
    return m_new, l_i, acc, p


@gluon.jit
def attention_fwd_gluon_kernel(
    Q, K, V, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qi, stride_qj,
    stride_kb, stride_kh, stride_ki, stride_kk,
    stride_vb, stride_vh, stride_vi, stride_vk,
    stride_ob, stride_oh, stride_oi, stride_oj,
    stride_bb, stride_bh, stride_bj, stride_bk,
    stride_lb, stride_lh, stride_li, stride_lj,
    H, R, L, scale,
    BLOCK_J: gl.constexpr, BLOCK_K: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
    PREFETCH: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_K, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)
    kv_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128 if HEAD_DIM * 2 >= 128 else HEAD_DIM * 2,
                                                 element_bitwidth=16, rank=2)
    b_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128 if BLOCK_K * 2 >= 128 else BLOCK_K * 2,
                                                element_bitwidth=16, rank=2)
    kv_cols: gl.constexpr = HEAD_DIM // 8
    kv_load: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // kv_cols, kv_cols],
                                             warps_per_cta=[4, 1], order=[1, 0])
    b_cols: gl.constexpr = BLOCK_K // 8
    b_load: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // b_cols, b_cols],
                                            warps_per_cta=[4, 1], order=[1, 0])

    j_block = gl.program_id(0)
    row0 = gl.program_id(1).to(gl.int64) * 2
    row1 = gl.minimum(row0 + 1, R - 1)  # an odd last row is computed twice and stored once
    bh = gl.program_id(2)
    b = (bh // H).to(gl.int64)
    h = (bh % H).to(gl.int64)
    scale = scale.to(gl.float32)

    # q of both rows, scaled, as register A operands.
    offs_qj = j_block * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(1, q_layout))
    offs_qd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
    q_rel = offs_qj.to(gl.int64)[:, None] * stride_qj + offs_qd[None, :]
    q_base = Q + b * stride_qb + h * stride_qh
    q0 = (gl.load(q_base + row0 * stride_qi + q_rel) * scale).to(dtype)
    q1 = (gl.load(q_base + row1 * stride_qi + q_rel) * scale).to(dtype)

    k_bufs0 = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, HEAD_DIM], kv_smem)
    k_bufs1 = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, HEAD_DIM], kv_smem)
    v_bufs0 = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, HEAD_DIM], kv_smem)
    v_bufs1 = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_K, HEAD_DIM], kv_smem)
    bias_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_J, BLOCK_K], b_smem)

    offs_kv_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, kv_load))
    offs_kv_c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_load))
    offs_b_r = gl.arange(0, BLOCK_J, layout=gl.SliceLayout(1, b_load))
    offs_b_c = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, b_load))
    k_row0 = K + b * stride_kb + h * stride_kh + row0 * stride_ki
    k_row1 = K + b * stride_kb + h * stride_kh + row1 * stride_ki
    v_row0 = V + b * stride_vb + h * stride_vh + row0 * stride_vi
    v_row1 = V + b * stride_vb + h * stride_vh + row1 * stride_vi
    bias_rows = BIAS + b * stride_bb + h * stride_bh + (j_block * BLOCK_J + offs_b_r).to(gl.int64)[:, None] * stride_bj

    n_iters = L // BLOCK_K
    for t in gl.static_range(PREFETCH):
        _issue_tile(k_bufs0, k_bufs1, v_bufs0, v_bufs1, bias_bufs, t, k_row0, k_row1, v_row0, v_row1, bias_rows,
                    t * BLOCK_K, offs_kv_r, offs_kv_c, offs_b_c, stride_kk, stride_vk, stride_bk)
        async_copy.commit_group()

    m0 = gl.full([BLOCK_J], float("-inf"), gl.float32, layout=s_row)
    m1 = gl.full([BLOCK_J], float("-inf"), gl.float32, layout=s_row)
    l0 = gl.zeros([BLOCK_J], gl.float32, layout=s_row)
    l1 = gl.zeros([BLOCK_J], gl.float32, layout=s_row)
    acc0 = gl.zeros([BLOCK_J, HEAD_DIM], gl.float32, layout=o_layout)
    acc1 = gl.zeros([BLOCK_J, HEAD_DIM], gl.float32, layout=o_layout)
    acc0_tok = warpgroup_mma_init(acc0)
    acc1_tok = warpgroup_mma_init(acc1)

    for it in range(n_iters):
        stage = it % NUM_STAGES
        async_copy.wait_group(PREFETCH - 1)
        gl.thread_barrier()
        nxt = it + PREFETCH
        if nxt < n_iters:
            _issue_tile(k_bufs0, k_bufs1, v_bufs0, v_bufs1, bias_bufs, nxt % NUM_STAGES, k_row0, k_row1, v_row0,
                        v_row1, bias_rows, nxt * BLOCK_K, offs_kv_r, offs_kv_c, offs_b_c,
                        stride_kk, stride_vk, stride_bk)
        async_copy.commit_group()
        fence_async_shared()
        bias0 = bias_bufs.index(stage).load(s_layout).to(gl.float32)
        s0_tok = warpgroup_mma(q0, k_bufs0.index(stage).permute((1, 0)), bias0, is_async=True)
        bias1 = bias_bufs.index(stage).load(s_layout).to(gl.float32)
        s1_tok = warpgroup_mma(q1, k_bufs1.index(stage).permute((1, 0)), bias1, is_async=True)
        # All but the newest group done: row 0's scores and both rows' previous P·V.
        s0, acc0, acc1 = warpgroup_mma_wait(1, deps=[s0_tok, acc0_tok, acc1_tok])
        m0, l0, acc0, p0 = _softmax_step(s0, m0, l0, acc0, o_row, p_layout, dtype)
        acc0_tok = warpgroup_mma(p0, v_bufs0.index(stage), acc0, is_async=True)
        s1 = warpgroup_mma_wait(1, deps=[s1_tok])
        m1, l1, acc1, p1 = _softmax_step(s1, m1, l1, acc1, o_row, p_layout, dtype)
        acc1_tok = warpgroup_mma(p1, v_bufs1.index(stage), acc1, is_async=True)

    acc0, acc1 = warpgroup_mma_wait(0, deps=[acc0_tok, acc1_tok])
    async_copy.wait_group(0)

    offs_oj = j_block * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(1, o_layout))
    offs_od = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_rel = offs_oj.to(gl.int64)[:, None] * stride_oj + offs_od[None, :]
    o_base = OUT + b * stride_ob + h * stride_oh
    offs_lj = j_block * BLOCK_J + gl.arange(0, BLOCK_J, layout=s_row)
    lse_base = LSE + b * stride_lb + h * stride_lh + offs_lj.to(gl.int64) * stride_lj
    o_ok = offs_oj[:, None] < L
    l_ok = offs_lj < L
    _finish(m0, l0, acc0, o_base + row0 * stride_oi + o_rel, lse_base + row0 * stride_li, o_ok, l_ok, o_row, dtype)
    row1_in = row0 + 1 < R
    _finish(m1, l1, acc1, o_base + (row0 + 1) * stride_oi + o_rel, lse_base + (row0 + 1) * stride_li,
            o_ok & row1_in, l_ok & row1_in, o_row, dtype)


@gluon.jit
def _finish(m_i, l_i, acc, o_ptrs, lse_ptrs, o_mask, lse_mask, o_row: gl.constexpr, dtype: gl.constexpr):
    has_keys = l_i > 0
    l_safe = gl.where(has_keys, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, o_row)[:, None]
    m_final = gl.where(m_i == float("-inf"), 0.0, m_i) * LOG2E
    lse = gl.where(has_keys, m_final + gl.log2(l_safe), float("inf"))
    gl.store(o_ptrs, out.to(dtype), mask=o_mask)
    gl.store(lse_ptrs, lse, mask=lse_mask)


def launch(q, k, v, bias, scale, num_stages=3, prefetch=1, maxnreg=None, block_k=64):
    """Output and base-2 log-sum-exp, as flash_tt_attn's forward op returns them."""
    B, H, R, L, D = q.shape
    if L % 64 or L % block_k or any(t.stride(-1) != 1 for t in (q, k, v, bias)):
        raise ValueError("forward_gluon.launch takes L a multiple of 64 and unit strides in the last dim")
    out = torch.empty_like(q)
    lse = torch.empty((B, H, R, L), dtype=torch.float32, device=q.device)
    grid = (L // 64, triton.cdiv(R, 2), B * H)
    opts = dict(num_warps=4)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    attention_fwd_gluon_kernel[grid](
        q, k, v, bias, out, lse,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], *bias.stride(), *lse.stride(),
        H, R, L, scale, BLOCK_J=64, BLOCK_K=block_k, HEAD_DIM=D, NUM_STAGES=num_stages, PREFETCH=prefetch, **opts)
    return out, lse
