"""Probe 16's question in code: the dq kernel with its loop's loads (k, v, and optionally the bias
tile) through tensor descriptors (TMA on Hopper) instead of pointer loads.

PERF.md's next step 2 expected TMA loads, which complete on mbarriers, to remove the CTA-wide barrier
that each pipelined iteration of dq and dk/dv ends in. This kernel is the library's dq kernel
(kernels/backward.py) cut down to the case that question needs: contiguous inputs, L a multiple of
64, no mask, one row i per program, q prescaled. It is an experiment, not a library path.
"""

import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from triton.tools.tensor_descriptor import TensorDescriptor

from flash_tt_attn import ops
from flash_tt_attn.kernels.common import exp2, prescale, scores, settle

BLOCK = 64


@triton.jit
def dq_tma_kernel(Q, K_DESC, V_DESC, BIAS_DESC, BIAS, OUT, DOUT, LSE, DELTA, DQ, H, L, scale,
                  BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                  LOOP_STAGES: tl.constexpr, SETTLE: tl.constexpr, BIAS_THROUGH_TMA: tl.constexpr,
                  FAST_EXP2: tl.constexpr):
    j_block = tl.program_id(0)
    i = tl.program_id(1)
    bh = tl.program_id(2)
    scale = tl.cast(scale, tl.float32)
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    # Row (b, h, i)'s first position in the (B·H·L·L, D) view of q, k, v, o, dO and the (B·H·L·L) view of lse.
    row_base = (bh.to(tl.int64) * L + i) * L
    qo_offsets = (row_base + offs_j[:, None]) * HEAD_DIM + offs_d[None, :]
    q = prescale(tl.load(Q + qo_offsets), scale, True)
    do = tl.load(DOUT + qo_offsets)
    o = tl.load(OUT + qo_offsets)
    lse = tl.load(LSE + row_base + offs_j)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_j, delta)
    dq = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    kv_row = row_base.to(tl.int32)  # descriptor coordinates are int32 (the launcher checks they fit)
    bias_row = (bh * L + j_block * BLOCK_J).to(tl.int32)
    bias_ptrs = BIAS + (bh.to(tl.int64) * L + offs_j[:, None]) * L + tl.arange(0, BLOCK_K)[None, :]
    for k_start in tl.range(0, L, BLOCK_K, num_stages=LOOP_STAGES):
        k_tile = K_DESC.load([kv_row + k_start, 0])
        v_tile = V_DESC.load([kv_row + k_start, 0])
        if BIAS_THROUGH_TMA:
            bias = BIAS_DESC.load([bias_row, k_start]).to(tl.float32)
        else:
            bias = tl.load(bias_ptrs + k_start).to(tl.float32)
        s = scores(q, tl.trans(k_tile), bias, scale, True, tl.float32, "tf32")
        p = exp2(s * 1.4426950408889634 - lse[:, None], FAST_EXP2)
        dp = tl.dot(do, tl.trans(v_tile), out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq = settle(dq + tl.dot(ds.to(k_tile.dtype), k_tile, out_dtype=tl.float32), SETTLE)
    tl.store(DQ + qo_offsets, (dq * scale).to(DQ.dtype.element_ty))


def dq_tma(q, k, v, bias, out, lse, dout, scale, bias_through_tma=True, stages=3):
    """dq and delta from dq_tma_kernel, for contiguous 16-bit inputs with L a multiple of 64."""
    B, H, L, _, D = q.shape
    if L % BLOCK or B * H * L * L >= 2**31 or not all(t.is_contiguous() for t in (q, k, v, bias, out, dout)):
        raise ValueError("dq_tma: needs contiguous inputs, L a multiple of 64 and B·H·L² < 2³¹")
    k_desc = TensorDescriptor.from_tensor(k.view(-1, D), [BLOCK, D])
    v_desc = TensorDescriptor.from_tensor(v.view(-1, D), [BLOCK, D])
    bias_desc = TensorDescriptor.from_tensor(bias.view(-1, L), [BLOCK, BLOCK])
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    on_gpu = q.device.type == "cuda"
    dq_tma_kernel[(L // BLOCK, L, B * H)](
        q, k_desc, v_desc, bias_desc, bias, out, dout, lse, delta, dq, H, L, scale,
        BLOCK_J=BLOCK, BLOCK_K=BLOCK, HEAD_DIM=D, LOOP_STAGES=stages, SETTLE=on_gpu,
        BIAS_THROUGH_TMA=bias_through_tma, FAST_EXP2=on_gpu, num_warps=4, num_stages=stages)
    return dq, delta


def dq_library(q, k, v, bias, out, lse, dout, scale):
    """dq and delta from the library's dq kernel, launched as attention_bwd launches it in eager mode (no
    mask): with torch's wrap_triton switched off, as inside the custom op. Outside it, wrap_triton is on
    (as while torch.compile traces), the launch goes through its dispatch and ops drops register caps
    (probe 18). Probes 16 and 17 ran this helper before it switched wrap_triton off; dq has no register
    cap, so only the dispatch differed for them."""
    delta = torch.empty_like(lse)
    no_mask = ops._mask_args(None, q)
    common = ops.backward_constants(q, no_mask, scale)
    with set_wrap_triton_enabled(False):
        dq = ops._launch_dq(dout, q, k, v, bias, no_mask, out, lse, delta, scale, common)
    return dq, delta
