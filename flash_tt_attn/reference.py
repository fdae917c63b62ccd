"""Pure-PyTorch definition of triangle attention.

Two functions live here:

* :func:`attention_reference` is the definition, written for clarity. It builds
  the full (B, H, L, L, L) score tensor, so use it only on small shapes (tests,
  fp64 comparisons).
* :func:`attention_chunked` computes the same function in chunks of rows ``i``
  and has a hand-written backward that recomputes each chunk, so forward and
  backward never hold more than ``chunk · L²`` scores per (b, h). It is the CPU
  path of :func:`flash_tt_attn.attention` when Triton's interpreter is off.

Semantics (for every b, h and row i)::

    s[j, k] = scale · q[b,h,i,j] · k[b,h,i,k] + bias[b,h,j,k]      (masked keys: -inf)
    o[b,h,i,j] = Σ_k softmax_k(s)[j, k] · v[b,h,i,k]

A row whose keys are all excluded (masked, or -inf bias) gives 0, never NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_chunked", "default_chunk_rows"]


def _masked_scores(q, k, bias, mask, scale):
    # q, k: (B, H, I, L, D) for a block of rows I; bias (B, H, L, L); mask (B, I, L) or None
    s = torch.einsum("bhijd,bhikd->bhijk", q, k) * scale + bias.unsqueeze(2)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :, None, :], float("-inf"))
    return s


def _safe_softmax(s):
    """Softmax over the last axis that returns 0 (not NaN) where every entry is -inf."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def attention_reference(q, k, v, bias, scale=None, mask=None):
    """Triangle attention by its definition (materialises B·H·L³ scores).

    Computes in the inputs' dtype; pass float64 tensors for a reference value.
    Differentiable through plain autograd.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    p = _safe_softmax(_masked_scores(q, k, bias, mask, scale))
    return torch.einsum("bhijk,bhikd->bhijd", p, v)


def default_chunk_rows(B, H, L, budget_elements=2**26):
    """Rows i per chunk so that one chunk's scores (B·H·rows·L·L) stay under the budget."""
    per_row = max(1, B * H * L * L)
    return max(1, min(L, budget_elements // per_row))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, chunk):
        L = q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty_like(q)
        for i0 in range(0, L, chunk):
            rows = slice(i0, min(L, i0 + chunk))
            m = None if mask is None else mask[:, rows]
            s = _masked_scores(q[:, :, rows].to(acc), k[:, :, rows].to(acc), bias.to(acc), m, scale)
            p = _safe_softmax(s)
            out[:, :, rows] = torch.einsum("bhijk,bhikd->bhijd", p, v[:, :, rows].to(acc)).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, mask)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        L = q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        for i0 in range(0, L, chunk):
            rows = slice(i0, min(L, i0 + chunk))
            m = None if mask is None else mask[:, rows]
            qc, kc, vc = (t[:, :, rows].to(acc) for t in (q, k, v))
            do = dout[:, :, rows].to(acc)
            p = _safe_softmax(_masked_scores(qc, kc, bias.to(acc), m, scale))
            dp = torch.einsum("bhijd,bhikd->bhijk", do, vc)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            dv[:, :, rows] = torch.einsum("bhijk,bhijd->bhikd", p, do).to(v.dtype)
            dq[:, :, rows] = (torch.einsum("bhijk,bhikd->bhijd", ds, kc) * scale).to(q.dtype)
            dk[:, :, rows] = (torch.einsum("bhijk,bhijd->bhikd", ds, qc) * scale).to(k.dtype)
            dbias += ds.sum(dim=2)
        return dq, dk, dv, dbias.to(bias.dtype), None, None, None


def attention_chunked(q, k, v, bias, scale=None, mask=None, chunk_rows=None):
    """Triangle attention in chunks of rows, O(chunk·L²) extra memory, fp32 math.

    Same semantics and gradients as :func:`attention_reference`; the output has
    q's dtype. ``chunk_rows`` defaults to :func:`default_chunk_rows`.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, R, L = q.shape[:4]  # R rows i (R = L unless q is a shard of rows)
    chunk = chunk_rows or min(default_chunk_rows(B, H, L), max(R, 1))
    return _ChunkedAttention.apply(q, k, v, bias, mask, float(scale), int(chunk))
