"""Probe 49's question in code: is part of the D=32 forward's time a fixed cost per program?

Probe 16 C and the `targets` rows give the forward's time per score at B4 H8 fp16 as 0.711, 0.619, 0.594 and
0.578 ns at L = 256, 512, 768, 1024, i.e. 4, 8, 12 and 16 key blocks per program. t = a + b/n fits all four
within 1.5% with a = 0.537 ns and b = 0.656 ns·blocks: each program pays about 1.2 key blocks' worth of time
that does not scale with L (loading q, filling the load pipeline before the first product, draining it, the
epilogue), 13% of the forward at L = 512 and 24% at L = 256.

This is the library's forward (kernels/forward.py) cut down to the case the question needs: contiguous
inputs, L a multiple of 64, no mask, two rows i per program (L even), q prescaled. With PERSISTENT, a grid of
``programs`` programs walks the same tiles in the library's order (query block fastest), each taking every
``programs``-th tile; with FLATTEN Triton flattens the tile loop and the key loop into one loop that it
pipelines as a whole, so the next tile's first loads are issued while the current tile's last blocks run.
An experiment, not a library path.
"""

import triton
import triton.language as tl

from flash_tt_attn.kernels.common import prescale, scores
from flash_tt_attn.kernels.forward import _finish_row, _online_softmax_update

ROWS = 2


@triton.jit
def _one_tile(Q, K, V, BIAS, OUT, LSE, tile, L, scale, offs_d,
              BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
              LOOP_STAGES: tl.constexpr, FAST_EXP2: tl.constexpr):
    """Rows (row0, row0 + 1) of one (b, h), queries of one block: the library forward's program."""
    blocks_j = L // BLOCK_J
    j_block = tile % blocks_j
    pair = tile // blocks_j  # (b·H + h)·(L/2) + row0/2
    base0 = pair.to(tl.int64) * 2 * L  # row (b, h, row0) starts here, in rows of D elements
    base1 = base0 + L
    bh = pair // (L // 2)
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    rel = offs_j[:, None] * HEAD_DIM + offs_d[None, :]
    q0 = prescale(tl.load(Q + base0 * HEAD_DIM + rel), scale, True)
    q1 = prescale(tl.load(Q + base1 * HEAD_DIM + rel), scale, True)
    m0 = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    m1 = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_J], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    bias_base = BIAS + bh.to(tl.int64) * L * L + offs_j[:, None] * L
    k0 = K + base0 * HEAD_DIM
    k1 = K + base1 * HEAD_DIM
    v0 = V + base0 * HEAD_DIM
    v1 = V + base1 * HEAD_DIM
    for k_start in tl.range(0, L, BLOCK_K, num_stages=LOOP_STAGES):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        kt_rel = offs_k[None, :] * HEAD_DIM + offs_d[:, None]
        v_rel = offs_k[:, None] * HEAD_DIM + offs_d[None, :]
        bias = tl.load(bias_base + offs_k[None, :]).to(tl.float32)
        s0 = scores(q0, tl.load(k0 + kt_rel), bias, scale, True, tl.float32, "tf32")
        s1 = scores(q1, tl.load(k1 + kt_rel), bias, scale, True, tl.float32, "tf32")
        m0, l0, acc0 = _online_softmax_update(s0, v0 + v_rel, m0, l0, acc0, offs_k, False, tl.float32, "tf32",
                                              FAST_EXP2)
        m1, l1, acc1 = _online_softmax_update(s1, v1 + v_rel, m1, l1, acc1, offs_k, False, tl.float32, "tf32",
                                              FAST_EXP2)
    everywhere = offs_j < L
    _finish_row(m0, l0, acc0, OUT + base0 * HEAD_DIM + rel, LSE + base0 + offs_j, everywhere[:, None], everywhere,
                OUT.dtype.element_ty)
    _finish_row(m1, l1, acc1, OUT + base1 * HEAD_DIM + rel, LSE + base1 + offs_j, everywhere[:, None], everywhere,
                OUT.dtype.element_ty)


@triton.jit
def forward_persistent_kernel(Q, K, V, BIAS, OUT, LSE, L, scale, tiles, programs,
                              BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
                              LOOP_STAGES: tl.constexpr, FAST_EXP2: tl.constexpr,
                              PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr):
    scale = tl.cast(scale, tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tiles, programs, flatten=FLATTEN):
            _one_tile(Q, K, V, BIAS, OUT, LSE, tile, L, scale, offs_d,
                      BLOCK_J, BLOCK_K, HEAD_DIM, LOOP_STAGES, FAST_EXP2)
    else:
        _one_tile(Q, K, V, BIAS, OUT, LSE, tl.program_id(0), L, scale, offs_d,
                  BLOCK_J, BLOCK_K, HEAD_DIM, LOOP_STAGES, FAST_EXP2)


def launch(q, k, v, bias, scale, programs=None, flatten=False, num_stages=3, max_registers=None):
    """The forward of contiguous (B, H, L, L, D) q, k, v and (B, H, L, L) bias: (out, base-2 lse).
    programs=None launches one program per tile (the library's grid); otherwise that many persistent ones."""
    import torch

    B, H, L, _, D = q.shape
    assert L % 64 == 0 and all(t.is_contiguous() for t in (q, k, v, bias))
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L, L), dtype=torch.float32, device=q.device)
    tiles = B * H * (L // ROWS) * (L // 64)
    grid = (tiles if programs is None else min(programs, tiles),)
    options = dict(num_warps=4, num_stages=num_stages)
    if max_registers is not None:
        options["maxnreg"] = max_registers
    forward_persistent_kernel[grid](q, k, v, bias, out, lse, L, scale, tiles, grid[0],
                                    BLOCK_J=64, BLOCK_K=64, HEAD_DIM=D, LOOP_STAGES=num_stages, FAST_EXP2=q.is_cuda,
                                    PERSISTENT=programs is not None, FLATTEN=flatten, **options)
    return out, lse
