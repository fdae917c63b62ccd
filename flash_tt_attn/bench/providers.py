"""The implementations a spec compares, each called on inputs in its own native layout.

Attention providers take q, k, v of shape (B, H, L, L, D) ("canonical") or (B, L, H, L, D) ("rows": the
row index i just after the batch, so folding rows into the batch is a free view) and bias (B, H, L, L).
:meth:`AttentionProvider.bind` does all the preparation that is not the call itself (masks, closures);
the zero-argument function it returns is what gets timed. Every provider uses the default scale
1/sqrt(D) and no mask (trifast needs a mask tensor: it gets an all-False one, meaning no key is masked).

A provider that cannot run here raises :class:`Unsupported` from ``load`` (missing package, no CUDA).

Two providers are not triangle attention: ``flex_plain`` and ``sdpa_cudnn_plain`` run plain attention over
the same B·L·H sequences of L keys with **no bias** (the same scores and products, none of the bias's
bytes, additions or gradient). They are reference ceilings for the latency specs, what the fastest kernels
on the GPU take for less work; a spec cannot ask them for errors (``spec.BIAS_FREE``).

Two run ours with ``lengths=`` (a padded tail, :func:`padded_lengths`): ``flash_tt_attn_lengths`` with odd batch
items of L/2 residues (what padding saves; its padded pairs are 0 by design, so no errors either:
``spec.PADDED``), and ``flash_tt_attn_lengths_full`` with every item of L residues (nothing padded: the
padded-tail kernels' cost on the same work as ``flash_tt_attn``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spec import variant_provider

__all__ = ["Unsupported", "AttentionProvider", "BlockProvider", "get_provider", "padded_lengths", "to_layout",
           "from_layout"]


class Unsupported(Exception):
    """The provider cannot run in this environment; the message says why."""


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Canonical (B, H, L, L, D) -> the provider's layout (a view; call ``.contiguous()`` to materialise)."""
    return t if layout == "canonical" else t.transpose(1, 2)


def from_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The provider's layout -> canonical (B, H, L, L, D) (a view)."""
    return t if layout == "canonical" else t.transpose(1, 2)


class AttentionProvider:
    """Base class: canonical layout, runs on any device."""

    name = ""
    layout = "canonical"
    cuda_only = False

    def load(self, device: torch.device) -> None:
        """Import what the provider needs; raise :class:`Unsupported` when it cannot run on ``device``."""
        if self.cuda_only and device.type != "cuda":
            raise Unsupported(f"{self.name} needs a CUDA device")

    def bind(self, q, k, v, bias) -> Callable[[], torch.Tensor]:
        """Return the function to time: one call on these (native-layout) inputs, returning the output."""
        raise NotImplementedError


class FlashTTAttn(AttentionProvider):
    name = "flash_tt_attn"

    def bind(self, q, k, v, bias):
        from flash_tt_attn import attention  # noqa: PLC0415

        return lambda: attention(q, k, v, bias)


class FlashTTAttnLengths(AttentionProvider):
    """Ours with ``lengths=`` from :func:`padded_lengths`: batch items of L and L/2 residues."""

    name = "flash_tt_attn_lengths"

    def lengths(self, B: int, L: int, device) -> torch.Tensor:
        return padded_lengths(B, L, device)

    def bind(self, q, k, v, bias):
        from flash_tt_attn import attention  # noqa: PLC0415

        lengths = self.lengths(q.shape[0], q.shape[-2], q.device)
        return lambda: attention(q, k, v, bias, lengths=lengths)


class FlashTTAttnLengthsFull(FlashTTAttnLengths):
    """Ours with ``lengths=`` of L for every item: the padded-tail kernels with nothing to skip."""

    name = "flash_tt_attn_lengths_full"

    def lengths(self, B: int, L: int, device) -> torch.Tensor:
        return torch.full((B,), L, dtype=torch.int64, device=device)


def naive_attention(q, k, v, bias):
    """The seed's vanilla PyTorch: einsum + bias + softmax + einsum, all in the input dtype (L³ memory)."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bhijd,bhikd->bhijk", q, k) * scale + bias.unsqueeze(2)
    return torch.einsum("bhijk,bhikd->bhijd", torch.softmax(s, dim=-1), v)


class Naive(AttentionProvider):
    name = "naive"

    def bind(self, q, k, v, bias):
        return lambda: naive_attention(q, k, v, bias)


class Sdpa(AttentionProvider):
    """``F.scaled_dot_product_attention`` per batch item: rows i folded into SDPA's batch, bias[b]
    expanded (a stride-0 view) over the rows as ``attn_mask``."""

    name = "sdpa"
    layout = "rows"

    def bind(self, q, k, v, bias):
        import torch.nn.functional as F  # noqa: PLC0415

        B, L, H = q.shape[:3]

        def run():
            outs = [F.scaled_dot_product_attention(q[b], k[b], v[b], attn_mask=bias[b].expand(L, H, L, L))
                    for b in range(B)]
            return torch.stack(outs)

        return run


_COMPILED_FLEX = None


def _load_compiled_flex():
    """``torch.compile(flex_attention)``, compiled once per process (shared by flex and flex_plain)."""
    global _COMPILED_FLEX
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415
    except ImportError as e:
        raise Unsupported(f"flex_attention not available in torch {torch.__version__}: {e}") from e
    if _COMPILED_FLEX is None:
        from torch._dynamo import config  # noqa: PLC0415

        # Every new (L, dtype, grad mode, score_mod) recompiles; keep them all instead of falling back to eager.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(config, knob):
                setattr(config, knob, max(getattr(config, knob), 512))
        # dynamic=False: a shape-generic kernel (what automatic dynamic shapes gives after the first
        # recompile) ran 8x slower on the H100; every L gets its own static kernel, as users would.
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class Flex(AttentionProvider):
    """``torch.compile(flex_attention)``, rows folded into the batch, score_mod adds bias[b // L, h, q, k]."""

    name = "flex"
    layout = "rows"
    cuda_only = True

    def load(self, device):
        super().load(device)
        _load_compiled_flex()

    def score_mod(self, bias, L):
        """The score_mod flex gets: adds the bias of the query's row i's batch item."""
        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[b // L, h, q_idx, kv_idx]

        return add_bias

    def bind(self, q, k, v, bias):
        B, L, H, _, D = q.shape
        fn = _COMPILED_FLEX
        score_mod = self.score_mod(bias, L)

        def run():
            flat = [t.view(B * L, H, L, D) for t in (q, k, v)]
            return fn(*flat, score_mod=score_mod).view(B, L, H, L, D)

        return run


class FlexPlain(Flex):
    """Reference ceiling, not triangle attention: compiled flex with no score_mod (no bias), rows folded
    into the batch as for flex. The bias is ignored, so it gets no gradient."""

    name = "flex_plain"

    def score_mod(self, bias, L):
        return None


class SdpaCudnnPlain(AttentionProvider):
    """Reference ceiling, not triangle attention: ``F.scaled_dot_product_attention`` forced onto cuDNN's
    fused attention kernel, with no bias (in torch 2.11 it has no kernel for the bias as a float attn_mask
    broadcast over the rows: "No available kernel"), rows folded into the batch. The bias is ignored."""

    name = "sdpa_cudnn_plain"
    layout = "rows"
    cuda_only = True

    def load(self, device):
        super().load(device)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
        except ImportError as e:
            raise Unsupported(f"torch.nn.attention.sdpa_kernel not available in torch {torch.__version__}") from e
        if not torch.backends.cudnn.is_available():
            raise Unsupported("cuDNN is not available")
        self._context = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

    def bind(self, q, k, v, bias):
        import torch.nn.functional as F  # noqa: PLC0415

        B, L, H, _, D = q.shape
        context = self._context

        def run():
            flat = [t.view(B * L, H, L, D) for t in (q, k, v)]
            with context():
                return F.scaled_dot_product_attention(*flat).view(B, L, H, L, D)

        return run


class Trifast(AttentionProvider):
    """trifast (PyPI): ``trifast.torch.triangle_attention(q, k, v, bias, mask)``, mask True = key left out."""

    name = "trifast"
    cuda_only = True

    def load(self, device):
        super().load(device)
        try:
            from trifast.torch import triangle_attention  # noqa: PLC0415
        except Exception as e:  # ImportError, or a broken install failing inside its import
            raise Unsupported(f"trifast not importable: {type(e).__name__}: {e}") from e
        self._fn = triangle_attention

    def bind(self, q, k, v, bias):
        B, _, L = q.shape[:3]
        mask = torch.zeros(B, L, L, dtype=torch.bool, device=q.device)
        fn = self._fn
        return lambda: fn(q, k, v, bias, mask)


class Cueq(AttentionProvider):
    """cuEquivariance: ``cuequivariance_torch.triangle_attention`` with q, k, v (B, N, H, Q, D) = rows layout
    and bias (B, 1, H, Q, K); it casts the bias to fp32 internally."""

    name = "cueq"
    layout = "rows"
    cuda_only = True

    def load(self, device):
        super().load(device)
        try:
            import cuequivariance_torch  # noqa: PLC0415

            self._fn = cuequivariance_torch.triangle_attention
        except Exception as e:
            raise Unsupported(f"cuequivariance_torch.triangle_attention not importable: {type(e).__name__}: {e}") \
                from e

    def bind(self, q, k, v, bias):
        fn = self._fn
        return lambda: fn(q, k, v, bias.unsqueeze(1))


class BlockProvider:
    """The whole AlphaFold TriangleAttention module from :mod:`flash_tt_attn.modules`."""

    def __init__(self, name: str, class_name: str):
        self.name, self.class_name = name, class_name

    def load(self, device: torch.device) -> None:
        """Find the module class; raise :class:`Unsupported` when it does not exist (yet)."""
        try:
            from flash_tt_attn import modules  # noqa: PLC0415
        except ImportError as e:
            raise Unsupported(f"flash_tt_attn.modules not importable: {e}") from e
        self._cls = getattr(modules, self.class_name, None)
        if self._cls is None:
            raise Unsupported(f"flash_tt_attn.modules has no {self.class_name}")

    def build(self, c_in: int, c_hidden: int, heads: int, starting: bool = True) -> torch.nn.Module:
        """A fresh module ``(c_in, c_hidden, no_heads, starting)`` (``starting=False``: the ending node's
        block, Algorithm 14); seed torch first for equal weights."""
        return self._cls(c_in, c_hidden, heads, starting=starting)

    def bind(self, module: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The function to time: one call of ``module`` on the pair tensor ``x`` (B, L, L, c_in)."""
        return lambda: module(x)


class ChunkedBlock(BlockProvider):
    """A block called with ``chunk_size=``: a number of rows, or ``"L"`` for the whole pair tensor at once
    (flash_tt_attn_whole: no chunking, also under ``no_grad``). The reference block with 4 or 128 rows is
    OpenFold-style chunking in plain PyTorch (OpenFold's inference default is 4; Boltz uses 128 above
    L=384): one unfused attention call per chunk of rows, the bias computed once."""

    def __init__(self, name: str, class_name: str, chunk):
        super().__init__(name, class_name)
        self.chunk = chunk

    def bind(self, module, x):
        chunk = x.shape[-2] if self.chunk == "L" else self.chunk
        return lambda: module(x, chunk_size=chunk)


def padded_lengths(B: int, L: int, device) -> torch.Tensor:
    """Residues per sequence in the padding sweep: L for even batch items, L // 2 (a padded tail) for odd."""
    return torch.tensor([L if b % 2 == 0 else L // 2 for b in range(B)], dtype=torch.int64, device=device)


class LengthsBlock(BlockProvider):
    """Our block called with ``lengths=`` (:func:`padded_lengths`): batch items of L and L/2 residues, on the
    input's device (``flash_tt_attn_lengths``: the block waits for the GPU to read them) or on the CPU
    (``flash_tt_attn_host_lengths``: no wait). Against flash_tt_attn at the same B (the full-length call) it
    measures what the padding costs."""

    def bind(self, module, x):
        device = "cpu" if self.name == "flash_tt_attn_host_lengths" else x.device
        lengths = padded_lengths(x.shape[0], x.shape[-2], device)
        return lambda: module(x, lengths=lengths)


class CueqBlock(BlockProvider):
    """Our block (same parameters, layer norm, projections, gating and chunking) with
    ``cuequivariance_torch.triangle_attention`` as its attention: :class:`flash_tt_attn.modules.
    TriangleAttention` with ``_attention_core`` replaced (q, k, v in cuEquivariance's (B, N, H, Q, D)
    layout, bias (B, 1, H, Q, K), mask (B, N, 1, 1, K); it masks with -1e9 rather than leaving keys out).
    ``fn`` stands in for cuEquivariance's function (tests)."""

    def __init__(self, name: str, fn=None):
        super().__init__(name, "TriangleAttention")
        self._fn = fn

    def load(self, device):
        if self._fn is None:
            if device.type != "cuda":
                raise Unsupported(f"{self.name} needs a CUDA device")
            try:
                import cuequivariance_torch  # noqa: PLC0415

                self._fn = cuequivariance_torch.triangle_attention
            except Exception as e:
                raise Unsupported(f"cuequivariance_torch.triangle_attention not importable: "
                                  f"{type(e).__name__}: {e}") from e
        from flash_tt_attn import modules  # noqa: PLC0415

        fn = self._fn

        class CueqTriangleAttention(modules.TriangleAttention):
            def _attention_core(self, q, k, v, bias, mask, extents):
                if extents is not None:
                    raise Unsupported("the cueq block takes no lengths= (no spec asks for it)")
                dtype = q.dtype
                q, k, v = (t.to(dtype).transpose(1, 2).contiguous() for t in (q, k, v))  # (B, R, H, L, D)
                m = None if mask is None else mask[:, :, None, None, :]
                with torch.autocast(device_type=q.device.type, enabled=False):
                    o = fn(q, k, v, bias.to(dtype).unsqueeze(1), m, scale=self.scale)
                return o.transpose(1, 2)

        self._cls = CueqTriangleAttention


_ATTENTION = {p.name: p for p in (FlashTTAttn, FlashTTAttnLengths, FlashTTAttnLengthsFull, Naive, Sdpa, Flex, Trifast,
                                  Cueq, FlexPlain, SdpaCudnnPlain)}
_BLOCK = {"flash_tt_attn": "TriangleAttention", "naive": "TriangleAttentionReference"}
#: Block providers with a chunk size (rows per chunk, or "L": the whole tensor at once).
_CHUNKED_BLOCK = {"flash_tt_attn_whole": ("TriangleAttention", "L"),
                  "naive_chunk4": ("TriangleAttentionReference", 4),
                  "naive_chunk128": ("TriangleAttentionReference", 128)}


class Variant:
    """A spec's variant of ``flash_tt_attn`` (``variants`` in the spec): the provider's calls run under
    ``flash_tt_attn.ops.override(**options)``, so every launch plan and config sees those switches."""

    def __init__(self, base, name: str, options: tuple):
        self.base, self.name, self.options = base, name, dict(options)
        self.layout = getattr(base, "layout", "canonical")

    def load(self, device):
        self.base.load(device)

    def build(self, *args, **kwargs):  # block providers: the module is the base's, its calls go through bind
        return self.base.build(*args, **kwargs)

    def bind(self, *args, **kwargs):
        from flash_tt_attn import ops  # noqa: PLC0415

        call, options = self.base.bind(*args, **kwargs), self.options

        def run():
            with ops.override(**options):
                return call()

        return run


def get_provider(op: str, name: str, options: tuple | None = None):
    """A fresh provider object for ``op`` (``attention`` or ``triangle_block``) by name; with ``options``
    (a spec's variant), the variant's provider (``flash_tt_attn`` unless the options name another) run under
    the other switches."""
    if options is not None:
        switches = tuple((option, value) for option, value in options if option != "provider")
        return Variant(get_provider(op, variant_provider(options)), name, switches)
    if op == "attention":
        return _ATTENTION[name]()
    if name in _CHUNKED_BLOCK:
        return ChunkedBlock(name, *_CHUNKED_BLOCK[name])
    if name in ("flash_tt_attn_lengths", "flash_tt_attn_host_lengths"):
        return LengthsBlock(name, "TriangleAttention")
    if name == "cueq":
        return CueqBlock(name)
    return BlockProvider(name, _BLOCK[name])
