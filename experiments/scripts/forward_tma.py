"""Probe 17's question in code: the forward kernel with its loop's loads (both rows' k and v tiles and the
shared bias tile) through tensor descriptors (TMA on Hopper) instead of pointer loads.

Probe 16 timed the dq kernel 2–5% faster that way (against a library launch that was not the custom op's;
PERF.md). This is the library's forward
(kernels/forward.py) cut down to the case the question needs: contiguous inputs, L a multiple of 64, no
mask, two rows i per program (R even), q prescaled. An experiment, not a library path.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flash_tt_attn.kernels.common import exp2, prescale, scores

BLOCK = 64
LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(s, v_tile, m_i, l_i, acc, FAST_EXP2: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new * 1.4426950408889634
    p = exp2(s * 1.4426950408889634 - m_shift[:, None], FAST_EXP2)
    alpha = exp2(m_i * 1.4426950408889634 - m_shift, FAST_EXP2)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, out_dtype=tl.float32)
    return m_new, l_i, acc


@triton.jit
def forward_tma_kernel(Q, K_DESC, V_DESC, BIAS_DESC, OUT, LSE, H, L, scale,
                       BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                       LOOP_STAGES: tl.constexpr, FAST_EXP2: tl.constexpr):
    j_block = tl.program_id(0)
    row0 = tl.program_id(1) * 2
    bh = tl.program_id(2)
    scale = tl.cast(scale, tl.float32)
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    # Rows (b, h, row0) and (b, h, row0 + 1) start here in the (B·H·L·L, D) views of q, k, v, o.
    base0 = (bh.to(tl.int64) * L + row0) * L
    base1 = base0 + L
    rel = offs_j[:, None] * HEAD_DIM + offs_d[None, :]
    q0 = prescale(tl.load(Q + base0 * HEAD_DIM + rel), scale, True)
    q1 = prescale(tl.load(Q + base1 * HEAD_DIM + rel), scale, True)
    m0 = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    m1 = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_J], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    kv0 = base0.to(tl.int32)  # descriptor coordinates are int32 (the launcher checks they fit)
    kv1 = base1.to(tl.int32)
    bias_row = (bh * L + j_block * BLOCK_J).to(tl.int32)
    for k_start in tl.range(0, L, BLOCK_K, num_stages=LOOP_STAGES):
        bias = BIAS_DESC.load([bias_row, k_start]).to(tl.float32)
        k0 = K_DESC.load([kv0 + k_start, 0])
        k1 = K_DESC.load([kv1 + k_start, 0])
        s0 = scores(q0, tl.trans(k0), bias, scale, True, tl.float32, "tf32")
        s1 = scores(q1, tl.trans(k1), bias, scale, True, tl.float32, "tf32")
        m0, l0, acc0 = _softmax_step(s0, V_DESC.load([kv0 + k_start, 0]), m0, l0, acc0, FAST_EXP2)
        m1, l1, acc1 = _softmax_step(s1, V_DESC.load([kv1 + k_start, 0]), m1, l1, acc1, FAST_EXP2)
    tl.store(OUT + base0 * HEAD_DIM + rel, (acc0 / l0[:, None]).to(OUT.dtype.element_ty))
    tl.store(OUT + base1 * HEAD_DIM + rel, (acc1 / l1[:, None]).to(OUT.dtype.element_ty))
    tl.store(LSE + base0 + offs_j, m0 * 1.4426950408889634 + tl.log2(l0))
    tl.store(LSE + base1 + offs_j, m1 * 1.4426950408889634 + tl.log2(l1))


def forward_tma(q, k, v, bias, scale, stages=3):
    """Output and base-2 log-sum-exp from forward_tma_kernel: contiguous 16-bit inputs, L a multiple of 64
    (so every row has keys and the library's fully-masked-row handling is not needed)."""
    B, H, L, _, D = q.shape
    if L % BLOCK or B * H * L * L >= 2**31 or not all(t.is_contiguous() for t in (q, k, v, bias)):
        raise ValueError("forward_tma: needs contiguous inputs, L a multiple of 64 and B·H·L² < 2³¹")
    k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [BLOCK, D])
    v_desc = TensorDescriptor.from_tensor(v.view(-1, D), [BLOCK, D])
    bias_desc = TensorDescriptor.from_tensor(bias.view(-1, L), [BLOCK, BLOCK])
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L, L), dtype=torch.float32, device=q.device)
    forward_tma_kernel[(L // BLOCK, L // 2, B * H)](
        q, k_desc, v_desc, bias_desc, out, lse, H, L, scale, BLOCK_J=BLOCK, BLOCK_K=BLOCK, HEAD_DIM=D,
        LOOP_STAGES=stages, FAST_EXP2=q.device.type == "cuda", num_warps=4, num_stages=stages)
    return out, lse
