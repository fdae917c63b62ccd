"""AlphaFold 2 triangle attention blocks (Algorithms 13 and 14) as ``nn.Module``.

Two classes with the same parameters:

* :class:`TriangleAttention` runs the fused kernel, :func:`flash_tt_attn.attention`.
* :class:`TriangleAttentionReference` does the same math in plain PyTorch (einsum,
  softmax, the full ``(B, H, L, L, L)`` score tensor, OpenFold's ``inf * (mask - 1)``
  mask bias). Tests compare against it; benchmarks use it as the unfused baseline.

Parameter layout
----------------
The state-dict keys are those of OpenFold's ``openfold.model.triangular_attention.
TriangleAttention``, so an OpenFold checkpoint loads without renaming
(:data:`OPENFOLD_KEYS`; the key mapping is the identity)::

    layer_norm.weight, layer_norm.bias   (c_in,)                  LayerNorm, eps 1e-5
    linear.weight                        (no_heads, c_in)          pair bias, no bias term
    mha.linear_q.weight                  (no_heads*c_hidden, c_in) no bias term
    mha.linear_k.weight                  (no_heads*c_hidden, c_in) no bias term
    mha.linear_v.weight                  (no_heads*c_hidden, c_in) no bias term
    mha.linear_g.weight, .bias           (no_heads*c_hidden, c_in), (no_heads*c_hidden,)  gate
    mha.linear_o.weight, .bias           (c_in, no_heads*c_hidden), (c_in,)              output

``c_hidden`` is the per-head width (as in OpenFold's code); queries are scaled by
``1/sqrt(c_hidden)``. ``linear_b`` is an alias of ``linear`` (the name the AlphaFold
supplement uses), not a separate parameter. Helpers: :meth:`TriangleAttention.from_openfold`,
:meth:`TriangleAttention.from_openfold_state_dict` and :func:`replace_openfold_triangle_attention`.

Masking: the one difference from OpenFold
------------------------------------------
OpenFold adds ``inf * (mask - 1)`` (``inf = 1e9``) to the scores. Wherever a row
has at least one valid key this is the same as leaving masked keys out, which is
what the kernel does, and the two agree to rounding. A row whose keys are *all*
masked differs: OpenFold's softmax then sees scores that all sit near ``-1e9`` and
returns a rounding-dependent, near-uniform average of the values, while the kernel
returns 0, so this block outputs ``linear_o.bias`` at those positions. Such rows
belong to padding residues (``mask[i, :]`` is all zero only when residue i is
padding), whose outputs do not reach valid positions; both are finite.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from .api import (
    SUPPORTED_HEAD_DIMS,
    check_inputs,
    check_lengths,
    extents_mask,
    layer_norm_rows,
    padded_extents,
    run_attention,
)
from .tuning import KernelOptions

__all__ = [
    "TriangleAttention",
    "TriangleAttentionReference",
    "OPENFOLD_KEYS",
    "auto_chunk_size",
    "runs_whole_without_free_memory",
    "replace_openfold_triangle_attention",
]

#: Bytes one chunk's activations may take when there is no free-memory figure to go by (CPU tensors).
CPU_CHUNK_BYTES = 2**28
#: On CUDA a chunk may take this fraction of the free memory (free in the driver plus PyTorch's cached,
#: unallocated blocks), and at most :data:`MAX_CHUNK_BYTES`: larger chunks save no time, only memory.
FREE_MEMORY_FRACTION = 0.25
MAX_CHUNK_BYTES = 2**31
#: On CUDA a forward without gradients whose activations for all its rows (auto_chunk_size's estimate) take
#: at most this many bytes runs whole without reading the free memory: the driver query and the caching
#: allocator's statistics cost host time on every call (the block's forward at L <= 384, B=1, c_in=128,
#: bf16 on the H200 took ~0.57 ms more per call once the query came in, v21), which small calls cannot hide.
#: 2**29 covers one pair tensor of L <= 384 at c_in=128 and four heads of 32 in bf16 (377 MB).
UNCHUNKED_CUDA_BYTES = 2**29
#: Pair positions (B·rows·L) per block of the chunked forward's bias pass, at least (see _forward_chunked).
BIAS_BLOCK_POSITIONS = 2**16


def auto_chunk_size(L: int, batch: int, c_in: int, width: int, itemsize: int,
                    free_bytes: Optional[int] = None) -> int:
    """Rows per chunk for a forward without gradients (a pure function of its arguments).

    One row of the pair tensor (per batch item) costs about ``L · (2·c_in + 8·width)`` elements of
    ``itemsize`` bytes in a chunk: its layer norm and output projection (c_in each); q, k, v, gate,
    the attention output, the gated product and the head-padded copies of q, k, v (``width =
    no_heads · c_hidden`` each). The chunk gets ``min(FREE_MEMORY_FRACTION · free_bytes,
    MAX_CHUNK_BYTES)`` bytes when ``free_bytes`` is given (CUDA) and :data:`CPU_CHUNK_BYTES`
    when it is None; the result is clamped to [1, L].

    >>> auto_chunk_size(8192, 1, 128, 128, 2, free_bytes=100 * 2**30)  # 2 GiB / 21 MB per row
    102
    >>> auto_chunk_size(256, 1, 128, 128, 2)  # small: one chunk, the whole tensor
    256
    """
    per_row = _row_bytes("auto_chunk_size", L, batch, c_in, width, itemsize)
    if free_bytes is None:
        budget = CPU_CHUNK_BYTES
    else:
        budget = min(int(FREE_MEMORY_FRACTION * max(int(free_bytes), 0)), MAX_CHUNK_BYTES)
    return max(1, min(L, budget // per_row))


def runs_whole_without_free_memory(L: int, batch: int, c_in: int, width: int, itemsize: int) -> bool:
    """Whether a CUDA forward without gradients runs its L rows whole without asking the driver for free
    memory: its activations (:func:`auto_chunk_size`'s estimate for all rows) fit in
    :data:`UNCHUNKED_CUDA_BYTES`.

    >>> runs_whole_without_free_memory(384, 1, 128, 128, 2), runs_whole_without_free_memory(512, 1, 128, 128, 2)
    (True, False)
    """
    return L * _row_bytes("runs_whole_without_free_memory", L, batch, c_in, width, itemsize) \
        <= UNCHUNKED_CUDA_BYTES


def _row_bytes(caller: str, L: int, batch: int, c_in: int, width: int, itemsize: int) -> int:
    """Bytes of one row's activations in a chunk (auto_chunk_size's docstring), arguments checked."""
    for name, value in (("L", L), ("batch", batch), ("c_in", c_in), ("width", width), ("itemsize", itemsize)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}(): {name} must be a positive int, got {value!r}")
    return batch * L * (2 * c_in + 8 * width) * itemsize


#: State-dict keys of one block, identical to OpenFold's ``TriangleAttention``.
OPENFOLD_KEYS = (
    "layer_norm.weight",
    "layer_norm.bias",
    "linear.weight",
    "mha.linear_q.weight",
    "mha.linear_k.weight",
    "mha.linear_v.weight",
    "mha.linear_o.weight",
    "mha.linear_o.bias",
    "mha.linear_g.weight",
    "mha.linear_g.bias",
)


class _HeadProjections(nn.Module):
    """The query, key, value, gate and output projections (OpenFold's ``Attention`` layout)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int):
        super().__init__()
        width = c_hidden * no_heads
        self.linear_q = nn.Linear(c_in, width, bias=False)
        self.linear_k = nn.Linear(c_in, width, bias=False)
        self.linear_v = nn.Linear(c_in, width, bias=False)
        self.linear_o = nn.Linear(width, c_in, bias=True)
        self.linear_g = nn.Linear(c_in, width, bias=True)


class _TriangleAttentionBase(nn.Module):
    """Parameters, projections and gating shared by the fused and the reference block."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9):
        super().__init__()
        for name, value in (("c_in", c_in), ("c_hidden", c_hidden), ("no_heads", no_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        self.c_in = c_in
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.starting = bool(starting)
        self.inf = float(inf)
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = nn.Linear(c_in, no_heads, bias=False)
        self.mha = _HeadProjections(c_in, c_hidden, no_heads)
        self.reset_parameters()

    @property
    def linear_b(self) -> nn.Linear:
        """The pair-bias projection (c_in -> no_heads); the same module as ``self.linear``."""
        return self.linear

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.c_hidden)

    def reset_parameters(self) -> None:
        """AlphaFold's initialisation: Glorot q/k/v, N(0, 1/c_in) bias projection,
        gate weight 0 and bias 1, output projection 0 (the block starts as a zero update)."""
        self.layer_norm.reset_parameters()
        with torch.no_grad():
            for lin in (self.mha.linear_q, self.mha.linear_k, self.mha.linear_v):
                nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(self.c_in))
            self.mha.linear_g.weight.zero_()
            self.mha.linear_g.bias.fill_(1.0)
            self.mha.linear_o.weight.zero_()
            self.mha.linear_o.bias.zero_()

    def extra_repr(self) -> str:
        return (f"c_in={self.c_in}, c_hidden={self.c_hidden}, no_heads={self.no_heads}, "
                f"starting={self.starting}, inf={self.inf:g}")

    @classmethod
    def from_openfold_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        starting: bool = True,
        inf: float = 1e9,
        prefix: str = "",
    ) -> _TriangleAttentionBase:
        """Build a block from an OpenFold ``TriangleAttention`` state dict.

        ``c_in``, ``no_heads`` and ``c_hidden`` are read off the tensor shapes. ``prefix``
        selects one block of a whole-model checkpoint, e.g.
        ``"evoformer.blocks.0.core.tri_att_start."``. ``starting`` is not stored in the
        checkpoint: OpenFold's Evoformer builds both of its blocks with ``starting=True``
        and transposes the pair tensor itself around ``tri_att_end``.
        The returned block holds copies on the tensors' device and dtype.
        """
        sd = {key: state_dict[prefix + key] for key in OPENFOLD_KEYS if prefix + key in state_dict}
        missing = [prefix + key for key in OPENFOLD_KEYS if key not in sd]
        if missing:
            raise KeyError(f"{cls.__name__}.from_openfold_state_dict: missing keys {missing}")
        no_heads, c_in = sd["linear.weight"].shape
        c_hidden = sd["mha.linear_q.weight"].shape[0] // no_heads
        ref = sd["mha.linear_q.weight"]
        block = cls(int(c_in), int(c_hidden), int(no_heads), starting=starting, inf=inf)
        block = block.to(device=ref.device, dtype=ref.dtype)
        block.load_state_dict(sd, strict=True)
        return block

    @classmethod
    def from_openfold(cls, module: nn.Module) -> _TriangleAttentionBase:
        """Build a block from an OpenFold ``TriangleAttention`` instance (weights copied).

        Reads ``c_in``, ``c_hidden``, ``no_heads``, ``starting`` and ``inf`` from the
        module, so starting/ending subclasses keep their orientation, and puts the
        copy on the module's device and dtype, in the module's train/eval mode.
        """
        block = cls(int(module.c_in), int(module.c_hidden), int(module.no_heads),
                    starting=bool(module.starting), inf=float(getattr(module, "inf", 1e9)))
        weight = module.linear.weight
        block = block.to(device=weight.device, dtype=weight.dtype)
        block.load_state_dict(module.state_dict(), strict=True)
        return block.train(module.training)

    #: Whether a forward without gradients chunks its rows when no ``chunk_size`` is given
    #: (:class:`TriangleAttention`: yes; the unfused reference chunks only when asked).
    _auto_chunk = False

    def _attention_core(self, q, k, v, bias, mask, extents):
        """q, k, v: (B, H, R, L, c_hidden) for R ≤ L rows i (R < L only in a chunked forward);
        bias (B, H, L, L), the whole bias; mask bool (B, R, L) or None; extents (B, 2) or None: a padded
        tail (api.padded_extents, for these R rows), whose keys are left out and whose padded pairs give 0."""
        raise NotImplementedError

    def _pair_mask(self, x, mask):
        """The bool (*, L, L) mask of ``x`` from ``mask``, or None."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{type(self).__name__}: mask must be a torch.Tensor or None, "
                                f"got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                mask = mask > 0.5
            mask = torch.broadcast_to(mask, x.shape[:-1])
        return mask

    def _chunk_rows(self, x, chunk_size, rows_total):
        """Rows per chunk for this call, or None to run the whole pair tensor at once."""
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(f"{type(self).__name__}: chunk_size must be a positive int or None, "
                                 f"got {chunk_size!r}")
            rows = chunk_size
        elif self._auto_chunk and not torch.is_grad_enabled():
            itemsize = torch.get_autocast_dtype(x.device.type).itemsize \
                if torch.is_autocast_enabled(x.device.type) else x.element_size()
            shape = (x.shape[-2], int(math.prod(x.shape[:-3])), self.c_in, self.no_heads * self.c_hidden, itemsize)
            free = None
            if x.device.type == "cuda":
                if runs_whole_without_free_memory(*shape):
                    return None
                free_now, _ = torch.cuda.mem_get_info(x.device)
                free = free_now + torch.cuda.memory_reserved(x.device) - torch.cuda.memory_allocated(x.device)
            rows = auto_chunk_size(*shape, free_bytes=free)
        else:
            return None
        return None if rows >= rows_total else rows

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                lengths: Optional[torch.Tensor] = None, **openfold_kwargs) -> torch.Tensor:
        """Apply the block (its update only: add the residual yourself, as OpenFold does).

        Args:
            x: pair representation (*, L, L, c_in); any number of leading dims (≥ 0).
            mask: optional (*, L, L) bool or float, broadcastable to ``x.shape[:-1]``;
                True / 1 = valid. Float masks are read as ``mask > 0.5``. For the ending
                node it is indexed like ``x`` (the block transposes both).
            chunk_size: rows of the pair tensor (the attended axis' rows: i for the starting
                node, j for the ending node) computed at a time: layer norm, projections,
                attention, gating and output projection of one block of rows, written into a
                preallocated output, the pair bias computed once beforehand. Peak memory is then
                about x + the output + the bias + one chunk's activations. ``None`` (default):
                :class:`TriangleAttention` picks a size by :func:`auto_chunk_size` when gradients
                are off (``torch.no_grad()``; on CUDA a call small enough for
                :func:`runs_whole_without_free_memory` runs whole without asking the driver for free
                memory), and runs unchunked when they are on;
                :class:`TriangleAttentionReference` chunks only when given a size. A size ≥ L
                runs the whole tensor at once. Every row goes through the same operations, so
                the output is bitwise the same for every size wherever the linear layers' matmuls
                round a row the same in a matrix of B·R·L rows as in one of B·L·L rows (checked
                for the kernels on CPU and on an H200 in bf16 and fp32, tests/test_chunking.py;
                MKL's fp32 GEMM below 12 rows is an exception, off by a few ulp). With
                gradients on, a given size chunks too: same output, gradients equal to rounding.
            lengths: optional integer (*,) tensor, ``x.shape[:-3]``: residues at positions
                ≥ ``lengths[b]`` are padding. At the real pairs the output equals (to rounding)
                the call with ``mask = (i < n) & (j < n)``; at the padded ones (i or j ≥ n) the
                attention output is 0, as :func:`flash_tt_attn.attention` gives, so the block
                returns the gated output projection of 0, i.e. its bias. Each item runs on its
                real crop ``x[b, :n, :n]`` (layer norm, projections, attention and gating of the
                real pairs only; the lengths are read on the host: pass them on the CPU, or a call
                on a GPU waits for the device once to read them);
                under ``torch.compile`` the whole batch runs at once with ``lengths=`` passed to
                the kernels, which skip the padded tiles.
            **openfold_kwargs: accepted and ignored, so calls written for OpenFold's
                module (``use_lma=``, ``use_memory_efficient_kernel=``, ``inplace_safe=``, ...)
                work unchanged.

        Returns:
            (*, L, L, c_in) tensor, dtype of the last projection (x's dtype, or the
            autocast dtype under ``torch.autocast``).
        """
        if x.dim() < 3 or x.shape[-3] != x.shape[-2] or x.shape[-1] != self.c_in:
            raise ValueError(f"{type(self).__name__}: x must have shape (*, L, L, c_in={self.c_in}), "
                             f"got {tuple(x.shape)}")
        L, lead = x.shape[-2], x.shape[:-3]
        mask = self._pair_mask(x, mask)
        if lengths is not None:
            check_lengths(lengths, lead, L, x.device, caller=f"{type(self).__name__}.forward()",
                          layout="x.shape[:-3]")
            lengths = lengths.reshape(-1)
        if not self.starting:  # a padded tail is the same on both pair dims: lengths need no transpose
            x = x.transpose(-2, -3)
            mask = None if mask is None else mask.transpose(-1, -2)
        x = x.reshape(-1, L, L, self.c_in)
        if mask is not None:
            mask = mask.reshape(-1, L, L)
        if lengths is not None and not torch.compiler.is_compiling():
            out = self._forward_cropped(x, mask, chunk_size, lengths)
        else:  # under torch.compile the kernels skip the padded tail (lengths are not read on the host)
            out = self._forward_items(x, mask, chunk_size, None if lengths is None else lengths.to(x.device))
        out = out.reshape(*lead, L, L, self.c_in)
        if not self.starting:
            out = out.transpose(-2, -3)
        return out

    def _forward_items(self, x, mask, chunk_size, lengths, out=None):
        """x (B, L, L, c_in), rows i along dim 1 (already transposed for the ending node): whole or chunked.
        ``out``: where to write the result (a view: the output projection of the whole call, or of each chunk,
        goes into it, by :meth:`_output_projection`), or None for a new tensor."""
        rows = self._chunk_rows(x, chunk_size, x.shape[1])
        if rows is not None:
            return self._forward_chunked(x, mask, rows, lengths, out)
        return self._forward_whole(x, mask, lengths, out)

    def _forward_cropped(self, x, mask, chunk_size, lengths):
        """:meth:`_forward_items` of each batch item on its real crop ``x[b, :n, :n]``, n = lengths[b].

        Layer norm, projections, gating and the output projection are row-wise, and the attention of a real
        pair reads real pairs only (its keys past n are left out), so the crop computes every real pair's
        output from the same inputs and skips the padded ones: 1/4 of the dense work of a half-length item,
        1/8 of its attention. A padded pair gets what the whole masked call gives it: attention output 0,
        gated 0, so the output projection of 0 (its bias). The lengths are read on the host (a wait for the
        device when they are on a GPU, none on the CPU). An item's output may differ from the whole batch's
        call by rounding only: the kernels and matmuls see an n-row problem, whose tiles or GEMM algorithm may
        differ from the L-row one's."""
        B, L = x.shape[0], x.shape[1]
        sizes = [int(n) for n in lengths.tolist()]
        if all(n == L for n in sizes):
            return self._forward_items(x, mask, chunk_size, None)
        padded = self.mha.linear_o(x.new_zeros(1, self.no_heads * self.c_hidden)).view(1, 1, self.c_in)
        out = padded.new_empty(B, L, L, self.c_in)
        for b, n in enumerate(sizes):
            if n:  # written in place: a chunked item's output is never held twice (measured v26: +4 GiB)
                crop = None if mask is None else mask[b:b + 1, :n, :n]
                self._forward_items(x[b:b + 1, :n, :n], crop, chunk_size, None, out=out[b:b + 1, :n, :n])
            out[b, n:] = padded
            out[b, :n, n:] = padded
        return out

    def _forward_whole(self, x, mask, lengths, out=None):
        """x (B, L, L, c_in), rows i along dim 1 (already transposed for the ending node); ``out`` as in
        :meth:`_forward_items`."""
        B, L, H, D = x.shape[0], x.shape[1], self.no_heads, self.c_hidden
        x = self._norm(x)
        q, k, v, g = self._head_projections(x)
        bias = self.linear(x).permute(0, 3, 1, 2)  # bias[b, h, j, k] comes from x[b, j, k]

        extents = None if lengths is None else padded_extents(lengths, L)
        o = self._attention_core(q, k, v, bias, mask, extents)  # (B, H, L, L, D)

        o = _gate(o, g).reshape(B, L, L, H * D)
        return self._output_projection(o, out)

    def _output_projection(self, o, out=None):
        """``mha.linear_o`` of the gated attention output o (B, R, L, H·D); with ``out`` (a tensor or view of
        the result's shape) the result is written there. Without autograd, when ``F.linear`` itself would run
        ``addmm`` on the flattened rows (contiguous o, a 1-D bias, no autocast, no hooks on the layer), that
        addmm writes straight into a contiguous ``out`` (the same kernel, so the same bits) instead of into a
        new tensor that is then copied: one pass over the output fewer (a padded batch's full-length items)."""
        linear = self.mha.linear_o
        if out is None:
            return linear(o)
        if (out.is_contiguous() and o.is_contiguous() and out.dtype == o.dtype == linear.weight.dtype
                and linear.bias is not None and not torch.is_grad_enabled() and type(linear) is nn.Linear
                and not torch.is_autocast_enabled(o.device.type) and not _has_forward_hooks(linear)):
            torch.addmm(linear.bias, o.reshape(-1, o.shape[-1]), linear.weight.t(), out=out.view(-1, out.shape[-1]))
            return out
        return out.copy_(linear(o))

    def _norm(self, x):
        """The layer norm of rows x (B, R, L, c_in)."""
        return self.layer_norm(x)

    def _head_projections(self, x):
        """q, k, v as (B, H, R, L, D) views and the gate's pre-activation (B, R, L, H*D) of the layer-normed
        rows ``x`` (B, R, L, c_in): one linear layer each."""
        B, R, L, H, D = *x.shape[:3], self.no_heads, self.c_hidden
        q, k, v = (lin(x).view(B, R, L, H, D).permute(0, 3, 1, 2, 4)
                   for lin in (self.mha.linear_q, self.mha.linear_k, self.mha.linear_v))
        return q, k, v, self.mha.linear_g(x)

    def _forward_chunked(self, x, mask, rows, lengths, out=None):
        """:meth:`_forward_whole` for blocks of ``rows`` rows i at a time, into a preallocated output
        (``out``, a (B, L, L, c_in) tensor or view of the result's dtype, when given).

        The same operations on each row as the whole call: layer norm, the linear layers (whose
        matmuls see a (R·L, c) rather than an (L·L, c) matrix: each output element is still one dot
        product over the same channels), attention of rows i (which read only row i and the shared
        bias) and gating. The bias needs every row before any attention, so a first pass computes it
        (layer norm and bias projection of one block at a time; the layer norm is computed again in
        the second pass rather than kept: one pair tensor less).
        """
        B, L, H, D = x.shape[0], x.shape[1], self.no_heads, self.c_hidden
        # The bias pass takes blocks of at least BIAS_BLOCK_POSITIONS pair positions: its projection to
        # no_heads channels is a thin matmul whose kernel choice changes at small M (cuBLAS fp32 with M = 200
        # rounds differently from M = 40000, measured on an H200), and its layer norm is cheap to hold.
        # The last block takes the remainder (no small tail block).
        bias_rows = max(rows, -(-BIAS_BLOCK_POSITIONS // (B * L)))
        bounds = [*range(0, L, bias_rows)][: max(1, L // bias_rows)] + [L]
        bias = None
        for r in (slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
            b_r = self.linear(self._norm(x[:, r])).permute(0, 3, 1, 2)  # (B, H, R, L)
            if bias is None:
                bias = b_r.new_empty(B, H, L, L)
            bias[:, :, r] = b_r
        for r in (slice(i0, min(L, i0 + rows)) for i0 in range(0, L, rows)):
            R = r.stop - r.start
            q, k, v, g = self._head_projections(self._norm(x[:, r]))
            extents = None if lengths is None else padded_extents(lengths, L, r.start, R)
            o = self._attention_core(q, k, v, bias, None if mask is None else mask[:, r], extents)
            o = _gate(o, g).reshape(B, R, L, H * D)
            if out is None:
                o = self._output_projection(o)
                out = o.new_empty(B, L, L, self.c_in)
                out[:, r] = o
            else:
                self._output_projection(o, out[:, r])
        return out


class TriangleAttention(_TriangleAttentionBase):
    """Triangle self-attention around the starting (Alg. 13) or ending (Alg. 14) node, fused.

    ``LayerNorm -> q, k, v, pair bias, gate -> attention() -> gate -> output projection``,
    with the parameter names and shapes of OpenFold's ``TriangleAttention`` (see the
    module docstring for the layout and the one masking difference).

    Args:
        c_in: channels of the pair representation.
        c_hidden: channels per head. Widths other than 16, 32, 64, 128 (up to 128) are
            zero-padded to the next one inside the block; the result is the same.
        no_heads: number of heads.
        starting: True for the starting node, False for the ending node (the block
            transposes x and mask over the two pair dims, runs, and transposes back).
        inf: kept for OpenFold compatibility; the fused block excludes masked keys
            outright, only :class:`TriangleAttentionReference` uses it.

    Shapes: ``x`` (*, L, L, c_in), ``mask`` (*, L, L) with 1 / True = valid; output
    (*, L, L, c_in). Inference (``torch.no_grad()``) runs blocks of rows at a time when the
    whole tensor's activations would not fit comfortably (``chunk_size=`` and
    :func:`auto_chunk_size`); ``lengths=`` is the padded-tail form of the mask (see ``forward``).
    Supports float16, bfloat16, float32, float64, ``torch.autocast``
    (q, k, v and the bias are given one dtype and the kernel runs with autocast off),
    ``torch.utils.checkpoint`` and ``torch.compile(fullgraph=True)``.

    Example::

        >>> import torch
        >>> from flash_tt_attn import TriangleAttention
        >>> block = TriangleAttention(c_in=16, c_hidden=16, no_heads=2, starting=True)
        >>> z = torch.randn(1, 8, 8, 16)
        >>> pair_mask = torch.ones(1, 8, 8)
        >>> block(z, mask=pair_mask).shape
        torch.Size([1, 8, 8, 16])
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9):
        if isinstance(c_hidden, int) and c_hidden > max(SUPPORTED_HEAD_DIMS):
            raise ValueError(f"TriangleAttention: c_hidden = {c_hidden} is larger than the kernel's largest "
                             f"head dim {max(SUPPORTED_HEAD_DIMS)}")
        super().__init__(c_in, c_hidden, no_heads, starting, inf)
        self._kernel_head_dim = min(d for d in SUPPORTED_HEAD_DIMS if d >= c_hidden)

    _auto_chunk = True

    def _norm(self, x):
        """With KernelOptions.block_triton_layer_norm on (the default), the Triton layer norm
        (api.layer_norm_rows), which reads the rows in place (the ending node's transposed view, a chunk) and
        many rows per program; it uses ``self.layer_norm``'s parameters without calling the module, so hooks
        registered on that submodule run only where the module's own norm does (compile, autocast, CPU)."""
        if _option("block_triton_layer_norm"):
            return layer_norm_rows(x, self.layer_norm)
        return self.layer_norm(x)

    def _head_projections(self, x):
        """With KernelOptions.block_fused_projections on, q, k, v and the gate come from one matmul with the
        four weights stacked (the gate's bias added in its epilogue; zeros for q, k, v): the normed rows are
        read once rather than four times, and one GEMM (one launch, one in the backward for x's gradient)
        replaces four. q, k, v and the gate are then column slices of one (B, R, L, 4·H·D) tensor. Each
        output element is still one dot product over the same c_in channels, so the values equal the
        separate projections' to rounding (a GEMM of another width may order its sums differently)."""
        if not _option("block_fused_projections"):
            return super()._head_projections(x)
        B, R, L, H, D = *x.shape[:3], self.no_heads, self.c_hidden
        m, width = self.mha, self.no_heads * self.c_hidden
        weight = torch.cat((m.linear_q.weight, m.linear_k.weight, m.linear_v.weight, m.linear_g.weight))
        bias = torch.cat((m.linear_g.bias.new_zeros(3 * width), m.linear_g.bias))
        q, k, v, g = F.linear(x, weight, bias).split(width, dim=-1)
        q, k, v = (t.view(B, R, L, H, D).permute(0, 3, 1, 2, 4) for t in (q, k, v))
        return q, k, v, g

    def _attention_core(self, q, k, v, bias, mask, extents):
        # One dtype for all four (under autocast: the autocast dtype the projections gave).
        # The permuted projections themselves (strided views), or contiguous copies with KernelOptions.block_qkv_copies
        # on (as before v30): attention() reads any strides, and the same values give the same bits either way.
        dtype = q.dtype
        k, v, bias = k.to(dtype), v.to(dtype), bias.to(dtype).contiguous()
        pad = self._kernel_head_dim - self.c_hidden
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        elif _option("block_qkv_copies"):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with torch.autocast(device_type=q.device.type, enabled=False):
            if q.shape[2] == q.shape[3]:
                check_inputs(q, k, v, bias, self.scale, mask, caller="TriangleAttention")
            else:  # a chunk of rows i (chunked forward): attention()'s checks and paths, for R < L rows
                check_inputs(q, k, v, bias, self.scale, mask, caller="TriangleAttention (chunked)", row_block=True)
            o = run_attention(q, k, v, bias, self.scale, mask, extents,
                              heads_last=_option("block_heads_last_output"))
        return o[..., : self.c_hidden] if pad else o


_DEFAULT_OPTIONS = KernelOptions()


def _gate(o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sigmoid(g) · o, (B, R, L, H, D) contiguous, for the attention output o (B, H, R, L, D) in either layout and
    the gate's pre-activation g (B, R, L, H·D). The gate comes first in the product: an elementwise result takes
    its first operand's memory layout, and o first (heads-first) gave a (B, H, R, L, D) result that the reshape
    to H·D channels then copied (PERF.md v34)."""
    B, H, R, L, D = o.shape
    return torch.sigmoid(g).reshape(B, R, L, H, D) * o.permute(0, 2, 3, 1, 4)


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks, its own or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module_hooks._global_forward_hooks
                or module_hooks._global_forward_pre_hooks)


def _option(name: str):
    """The launchers' switch ``name`` (KernelOptions) now. Until something imports ops (which imports Triton and,
    on a CPU, fixes whether its interpreter runs), no switch can have been overridden: the defaults, without
    importing it, so that a CPU-only block stays as light as api."""
    ops = sys.modules.get(f"{__package__}.ops")
    return getattr(_DEFAULT_OPTIONS if ops is None else ops.options(), name)


class TriangleAttentionReference(_TriangleAttentionBase):
    """The same block in plain PyTorch, with OpenFold's math (unfused, O(B·H·L³) memory).

    Scores ``scale·q·kᵀ + bias + inf·(mask - 1)`` are materialised, soft-maxed (in at
    least float32) and multiplied with v: OpenFold's ``TriangleAttention`` math, so fully
    masked rows give a near-uniform average rather than the fused block's 0.
    Same constructor, parameters (state dict) and ``forward`` as :class:`TriangleAttention`;
    use it for tests on small shapes and as the unfused baseline in benchmarks.

    Example::

        >>> import torch
        >>> from flash_tt_attn import TriangleAttention, TriangleAttentionReference
        >>> fused = TriangleAttention(16, 16, 2, starting=False)
        >>> ref = TriangleAttentionReference(16, 16, 2, starting=False)
        >>> _ = ref.load_state_dict(fused.state_dict())
        >>> ref(torch.randn(1, 8, 8, 16)).shape
        torch.Size([1, 8, 8, 16])
    """

    def _attention_core(self, q, k, v, bias, mask, extents):
        real = None
        if extents is not None:
            real = extents_mask(extents, q.shape[2], q.shape[3])
            mask = real if mask is None else mask & real
        acc = torch.promote_types(q.dtype, torch.float32)
        s = torch.einsum("bhijd,bhikd->bhijk", q, k) * self.scale + bias[:, :, None]
        s = s.to(acc)
        if mask is not None:
            mask_bias = self.inf * (mask.to(acc) - 1.0)  # (B, L_i, L_k)
            s = s + mask_bias[:, None, :, None, :]
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("bhijk,bhikd->bhijd", p.to(v.dtype), v)
        return o if real is None else o * real[:, None, :, :, None]


def replace_openfold_triangle_attention(model: nn.Module, cls: type = TriangleAttention) -> int:
    """Swap every OpenFold ``TriangleAttention`` inside ``model`` for ``cls``, weights copied.

    A submodule is swapped when its class is named ``TriangleAttention``,
    ``TriangleAttentionStartingNode`` or ``TriangleAttentionEndingNode`` and it has
    OpenFold's ``layer_norm``, ``linear`` and ``mha`` children. Returns how many were
    swapped. The model's ``state_dict`` keys do not change, so checkpoints still load.
    """
    names = {"TriangleAttention", "TriangleAttentionStartingNode", "TriangleAttentionEndingNode"}
    todo = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child).__name__ in names and not isinstance(child, _TriangleAttentionBase)
                    and all(hasattr(child, a) for a in ("layer_norm", "linear", "mha"))):
                todo.append((parent, name, child))
    for parent, name, child in todo:
        setattr(parent, name, cls.from_openfold(child))
    return len(todo)

