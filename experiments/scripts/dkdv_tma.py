"""Probe 17's second kernel (which 5ec14a4 put into the library and 94a836e took out again, after probe 18):
dk/dv with its loop's loads (q and dO tiles, and the transposed bias tile from
the key-major bias copy) through tensor descriptors (TMA on Hopper) instead of pointer loads.

The library's dk/dv kernel (kernels/backward.py) cut down to contiguous inputs, L a multiple of 64, no mask,
one row i per program, k prescaled; lse and delta stay pointer loads. An experiment, not a library path.
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
def dkdv_tma_kernel(K, V, Q_DESC, DO_DESC, BIAS_T_DESC, LSE, DELTA, DK, DV, H, L, scale,
                    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                    LOOP_STAGES: tl.constexpr, SETTLE: tl.constexpr, FAST_EXP2: tl.constexpr):
    k_block = tl.program_id(0)
    i = tl.program_id(1)
    bh = tl.program_id(2)
    scale = tl.cast(scale, tl.float32)
    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    row_base = (bh.to(tl.int64) * L + i) * L  # row (b, h, i) in the (B·H·L·L, D) views and the (B·H·L·L) lse
    kv_offsets = (row_base + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
    k_tile = prescale(tl.load(K + kv_offsets), scale, True)
    v_tile = tl.load(V + kv_offsets)
    dk = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
    qdo_row = row_base.to(tl.int32)  # descriptor coordinates are int32 (the launcher checks they fit)
    bias_row = (bh * L + k_block * BLOCK_K).to(tl.int32)
    for j_start in tl.range(0, L, BLOCK_J, num_stages=LOOP_STAGES):
        q_tile = Q_DESC.load([qdo_row + j_start, 0])
        do_tile = DO_DESC.load([qdo_row + j_start, 0])
        bias_t = BIAS_T_DESC.load([bias_row, j_start]).to(tl.float32)
        offs_j = row_base + j_start + tl.arange(0, BLOCK_J)
        lse = tl.load(LSE + offs_j)
        delta = tl.load(DELTA + offs_j)
        st = scores(k_tile, tl.trans(q_tile), bias_t, scale, True, tl.float32, "tf32")
        pt = exp2(st * 1.4426950408889634 - lse[None, :], FAST_EXP2)
        dv += tl.dot(pt.to(do_tile.dtype), do_tile, out_dtype=tl.float32)
        dpt = tl.dot(v_tile, tl.trans(do_tile), out_dtype=tl.float32)
        dst = pt * (dpt - delta[None, :])
        dk = settle(dk + tl.dot(dst.to(q_tile.dtype), q_tile, out_dtype=tl.float32), SETTLE)
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty))


def dkdv_tma(q, k, v, bias, lse, delta, dout, scale, stages=3, max_registers=168):
    """dk and dv from dkdv_tma_kernel (contiguous 16-bit inputs, L a multiple of 64), with the key-major
    bias copy made here as the library makes it."""
    B, H, L, _, D = q.shape
    if L % BLOCK or B * H * L * L >= 2**31 or not all(t.is_contiguous() for t in (q, k, v, dout)):
        raise ValueError("dkdv_tma: needs contiguous inputs, L a multiple of 64 and B·H·L² < 2³¹")
    key_major = bias.mT.contiguous()  # (B, H, L_k, L_j)
    q_desc = TensorDescriptor.from_tensor(q.view(-1, D), [BLOCK, D])
    do_desc = TensorDescriptor.from_tensor(dout.view(-1, D), [BLOCK, D])
    bias_desc = TensorDescriptor.from_tensor(key_major.view(-1, L), [BLOCK, BLOCK])
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    on_gpu = q.device.type == "cuda"
    options = dict(maxnreg=max_registers) if on_gpu and max_registers else {}
    dkdv_tma_kernel[(L // BLOCK, L, B * H)](
        k, v, q_desc, do_desc, bias_desc, lse, delta, dk, dv, H, L, scale,
        BLOCK_J=BLOCK, BLOCK_K=BLOCK, HEAD_DIM=D, LOOP_STAGES=stages, SETTLE=on_gpu, FAST_EXP2=on_gpu,
        num_warps=4, num_stages=stages, **options)
    return dk, dv


def dkdv_library(q, k, v, bias, lse, delta, dout, scale):
    """dk and dv from the library's kernel, launched as attention_bwd launches it in eager mode (no mask),
    with wrap_triton switched off as inside the custom op. Probe 17 ran this helper before it did that:
    its launch then went through wrap_triton's dispatch, which makes ops drop the kernel's 168-register
    cap, so probe 17 timed the library's dk/dv uncapped (probe 18; PERF.md)."""
    no_mask = ops._mask_args(None, q)
    common = ops.backward_constants(q, no_mask, scale)
    with set_wrap_triton_enabled(False):
        return ops._launch_dkdv(dout, q, k, v, bias, no_mask, lse, delta, scale, common)
