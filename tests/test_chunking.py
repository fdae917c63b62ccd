"""Chunked inference in the block (issue 25) and the ``lengths`` form of a padded-tail mask.

Chunked == unchunked is checked bitwise (torch.equal) for TriangleAttention: each row of the pair
tensor goes through the same layer norm, linear layers, attention and gating whether it is computed
with the other rows or in a block of R rows. On CPU under Triton's interpreter, at tiny shapes.

One exception, measured here (test_tiny_fp32_chunks_are_close_not_bitwise): MKL's fp32 GEMM takes
another kernel, which rounds differently, for matrices of fewer than 12 rows (M = 1-3, 5-7, 9-11 on
this CPU; 4 and 8 and every M ≥ 12 agree with the big matrix's rows). A chunk's linear layers see
M = B·R·L rows, so with B·L ≥ 12 every chunk size is bitwise; the shapes below keep B·L ≥ 12.
fp16/bf16 linears agree at every M. On CUDA, cuBLAS picks its kernel by shape too: the GPU test
at the end checks the claim at block-sized shapes.
"""

import math

import pytest
import torch

import flash_tt_attn as fta
from flash_tt_attn import api, modules, ops
from flash_tt_attn.api import lengths_mask
from flash_tt_attn.modules import auto_chunk_size

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def assert_chunked_equal(got, whole, what=""):
    """Bitwise where the kernels run (Triton's interpreter here, CUDA); close on the PyTorch CPU path
    (reference.attention_chunked, TRITON_INTERPRET unset), whose einsums on a block of rows' strided
    slices round differently from the whole tensor's."""
    if got.device.type == "cuda" or api._uses_triton(got.device, torch.float32):
        assert torch.equal(got, whole), what
    else:
        torch.testing.assert_close(got, whole, rtol=1e-2, atol=1e-2, msg=what)


def block(cls=fta.TriangleAttention, starting=True, c_in=8, c_hidden=16, heads=2, dtype=torch.float32, seed=0):
    """A block with random weights everywhere (AlphaFold's init zeroes the output projection)."""
    m = cls(c_in, c_hidden, heads, starting=starting)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) + (p.dim() == 1) * 0.5)
    return m.to(dtype)


def pair(B=2, L=5, c_in=8, dtype=torch.float32):
    x = torch.randn(B, L, L, c_in).to(dtype)
    mask = (torch.rand(B, L, L) < 0.7) | torch.eye(L, dtype=torch.bool)
    mask[0, 1] = False  # one row with no valid key (0 attention output there)
    return x, mask


@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("starting", [True, False], ids=["start", "end"])
def test_chunked_equals_unchunked_bitwise(starting, dtype, use_mask):
    """Every linear layer of a chunk multiplies a (B·R·L, c) matrix where the whole call multiplies (B·L·L, c):
    bitwise equal only where the GEMM gives each row the same bits whatever the matrix's height. PyTorch's CPU
    GEMM does not for very short matrices (measured: fp32 with ≤ 11 rows; bf16 on an AVX512-BF16 CPU with ≤ 16
    rows against 400, one element in 12 rows against 72 here with L = 6), so here every chunk has ≥ 24 rows."""
    L = 12
    m = block(starting=starting, dtype=dtype)
    x, mask = pair(L=L, dtype=dtype)
    mask = mask if use_mask else None
    whole = m(x, mask)  # gradients on: today's unchunked path
    with torch.no_grad():
        for chunk in (1, 5, L, L + 3):  # 5: blocks of 5, 5 and 2 rows
            got = m(x, mask, chunk_size=chunk)
            assert_chunked_equal(got, whole.detach(), f"chunk_size={chunk}")
            assert got.stride() == whole.stride() and got.dtype == whole.dtype


def test_chunked_leading_dims_and_float_mask():
    m = block(starting=False)
    x = torch.randn(2, 1, 12, 12, 8)
    mask = (torch.rand(2, 1, 12, 12) < 0.7).float()
    with torch.no_grad():
        assert_chunked_equal(m(x, mask, chunk_size=5), m(x, mask, chunk_size=12))
        assert_chunked_equal(m(x[0, 0], mask[0, 0], chunk_size=7), m(x[0, 0], mask[0, 0], chunk_size=12))


def test_chunked_under_autocast_equals_unchunked():
    m = block()
    x, mask = pair(L=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, whole = m(x, mask, chunk_size=3), m(x, mask, chunk_size=4)
    assert got.dtype == torch.bfloat16
    assert_chunked_equal(got, whole)


@pytest.mark.parametrize("starting", [True, False], ids=["start", "end"])
def test_reference_block_chunks_when_asked(starting):
    """The unfused reference chunks too (OpenFold-style chunking for the benchmarks), but not bitwise in
    fp32: its score einsum runs on strided (permuted) views whose strides differ between a block of rows
    and the whole tensor, and the matmul it picks then rounds differently (a few ulp)."""
    m = block(fta.TriangleAttentionReference, starting=starting)
    x, mask = pair(L=5)
    with torch.no_grad():
        whole = m(x, mask)  # the reference never chunks on its own
        for chunk in (1, 3):
            torch.testing.assert_close(m(x, mask, chunk_size=chunk), whole, rtol=1e-6, atol=1e-6)


def test_tiny_fp32_chunks_are_close_not_bitwise():
    """B·R·L < 12 in fp32: MKL's small-matrix GEMM rounds the projections differently (a few ulp)."""
    with torch.no_grad():
        m = block()
        x, _ = pair(B=1, L=5)
        torch.testing.assert_close(m(x, chunk_size=1), m(x, chunk_size=5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("switches", [{"block_fused_projections": True}, {"block_triton_layer_norm": False},
                                      {"block_fused_projections": True, "block_triton_layer_norm": False}],
                         ids=["fused", "torch-layer-norm", "fused-torch-layer-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_switches_keep_chunked_equal_to_unchunked_bitwise(dtype, switches):
    """KernelOptions.block_fused_projections (one stacked matmul per chunk) and block_triton_layer_norm off
    (PyTorch's norm; on, the default, the Triton norm reads a chunk's rows and the bias pass's blocks in place,
    tested above): each row still gets the whole call's bits (every chunk ≥ 24 rows, as above)."""
    L = 12
    m = block(dtype=dtype)
    x, mask = pair(L=L, dtype=dtype)
    with ops.override(**switches), torch.no_grad():
        whole = m(x, mask, chunk_size=L)
        for chunk in (1, 5):
            assert_chunked_equal(m(x, mask, chunk_size=chunk), whole, f"chunk_size={chunk}")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused-torch-layer-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("starting", [True, False], ids=["start", "end"])
def test_gpu_chunked_equals_unchunked_bitwise(starting, dtype, fused):
    """The kernels and cuBLAS at a block's widths (c=128, 4 heads of 32), L=200: chunks of 1, 64, 77 rows; with
    the defaults (the Triton layer norm, the q, k, v and gate projections apart), and with PyTorch's layer norm
    and one matmul (KernelOptions.block_triton_layer_norm off, block_fused_projections on)."""
    m = block(starting=starting, c_in=128, c_hidden=32, heads=4).to(device="cuda", dtype=dtype)
    x = torch.randn(1, 200, 200, 128, device="cuda").to(dtype)
    mask = (torch.rand(1, 200, 200, device="cuda") < 0.9) | torch.eye(200, dtype=torch.bool, device="cuda")
    lengths = torch.tensor([150], device="cuda")  # a padded tail: per-chunk extents, chunks past the tail
    with torch.no_grad(), ops.override(block_fused_projections=fused, block_triton_layer_norm=not fused):
        whole = m(x, mask, chunk_size=200)
        padded = m(x, mask, chunk_size=200, lengths=lengths)
        for chunk in (1, 64, 77):
            assert torch.equal(m(x, mask, chunk_size=chunk), whole), f"chunk_size={chunk}"
            assert torch.equal(m(x, mask, chunk_size=chunk, lengths=lengths), padded), f"lengths, chunk_size={chunk}"


# ---------------------------------------------------------------------------------------- chunk sizes


def test_auto_chunk_size_is_a_pure_function_of_its_arguments():
    per_row = 8192 * (2 * 128 + 8 * 128) * 2  # one row of an L=8192, c=128, 4x32-head bf16 block
    assert auto_chunk_size(8192, 1, 128, 128, 2, free_bytes=100 * 2**30) == modules.MAX_CHUNK_BYTES // per_row
    assert auto_chunk_size(8192, 1, 128, 128, 2, free_bytes=4 * 2**30) == 2**30 // per_row  # a quarter of free
    assert auto_chunk_size(8192, 2, 128, 128, 2, free_bytes=4 * 2**30) == 2**30 // (2 * per_row)
    assert auto_chunk_size(8192, 1, 128, 128, 2, free_bytes=0) == 1  # never below one row
    assert auto_chunk_size(768, 1, 128, 128, 2, free_bytes=100 * 2**30) == 768  # never above L
    assert auto_chunk_size(16, 1, 8, 32, 4) == 16  # CPU: the fixed budget
    assert auto_chunk_size(4096, 1, 128, 128, 4) == modules.CPU_CHUNK_BYTES // (4096 * 1280 * 4)
    with pytest.raises(ValueError, match="L must be a positive int"):
        auto_chunk_size(0, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="itemsize"):
        auto_chunk_size(8, 1, 8, 8, 2.0)


def test_small_cuda_calls_run_whole_without_reading_free_memory():
    """The rule's edge: all rows' activations (auto_chunk_size's per-row bytes times L) against
    UNCHUNKED_CUDA_BYTES; batch, widths and itemsize count as they do for the chunk size."""
    row = lambda L, batch=1, c=128, w=128, size=2: batch * L * (2 * c + 8 * w) * size
    limit = modules.UNCHUNKED_CUDA_BYTES
    assert row(384) * 384 <= limit < row(512) * 512  # the docstring's claim: L <= 384 at c=128, 4x32, bf16
    assert modules.runs_whole_without_free_memory(384, 1, 128, 128, 2)
    assert not modules.runs_whole_without_free_memory(512, 1, 128, 128, 2)
    assert not modules.runs_whole_without_free_memory(384, 2, 128, 128, 2)  # B=2 doubles the bytes
    assert not modules.runs_whole_without_free_memory(384, 1, 128, 128, 4)  # so does fp32
    edge = max(L for L in range(1, 1024) if row(L) * L <= limit)
    assert modules.runs_whole_without_free_memory(edge, 1, 128, 128, 2)
    assert not modules.runs_whole_without_free_memory(edge + 1, 1, 128, 128, 2)
    with pytest.raises(ValueError, match="runs_whole_without_free_memory\\(\\): batch must be a positive int"):
        modules.runs_whole_without_free_memory(8, 0, 8, 8, 2)


@pytest.mark.gpu
def test_gpu_small_no_grad_forward_asks_the_driver_nothing(monkeypatch):
    """Below UNCHUNKED_CUDA_BYTES the no-grad forward neither reads free memory nor chunks; above it, it
    does read it (and with a quarter of the free memory too small for the whole tensor, chunks)."""
    m = block(c_in=128, c_hidden=32, heads=4).to("cuda")
    x = torch.randn(1, 200, 200, 128, device="cuda")  # the shapes test_gpu_chunked_equals_unchunked_bitwise checks
    asked = []
    real = torch.cuda.mem_get_info
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: asked.append(a) or real(*a))
    chunked = []
    real_chunked = modules._TriangleAttentionBase._forward_chunked
    monkeypatch.setattr(modules._TriangleAttentionBase, "_forward_chunked",
                        lambda self, x, mask, rows, lengths, out=None: chunked.append(rows)
                        or real_chunked(self, x, mask, rows, lengths, out))
    with torch.no_grad():
        whole = m(x)
        assert asked == [] and chunked == []
        monkeypatch.setattr(modules, "UNCHUNKED_CUDA_BYTES", 0)
        monkeypatch.setattr(modules, "MAX_CHUNK_BYTES", 64 * 200 * (2 * 128 + 8 * 128) * 4)  # 64 rows a chunk
        got = m(x)
    assert len(asked) == 1 and chunked == [64]
    assert torch.equal(got, whole)


def test_no_grad_forward_chunks_automatically(monkeypatch):
    m = block()
    x, mask = pair(L=6)
    with torch.no_grad():
        whole = m(x, mask)  # the CPU budget fits 6 rows: one chunk, the whole tensor
    seen = []
    real = modules._TriangleAttentionBase._forward_chunked
    monkeypatch.setattr(modules._TriangleAttentionBase, "_forward_chunked",
                        lambda self, x, mask, rows, lengths, out=None: seen.append(rows)
                        or real(self, x, mask, rows, lengths, out))
    per_row = 6 * (2 * 8 + 8 * 32) * 4
    monkeypatch.setattr(modules, "CPU_CHUNK_BYTES", 2 * 2 * per_row)  # B=2: two rows per chunk
    with torch.no_grad():
        got = m(x, mask)
    assert seen == [2]
    assert_chunked_equal(got, whole)
    ref = block(fta.TriangleAttentionReference)
    with torch.no_grad():
        ref(x, mask)
    assert seen == [2], "the reference does not chunk on its own"


def test_grad_path_unchanged_without_chunk_size(monkeypatch):
    m = block()
    x, mask = pair(L=4)

    def fail(*args):
        raise AssertionError("chunked with gradients on and no chunk_size")

    monkeypatch.setattr(modules._TriangleAttentionBase, "_forward_chunked", fail)
    monkeypatch.setattr(modules, "CPU_CHUNK_BYTES", 1)
    xg = x.clone().requires_grad_()
    m(xg, mask).sum().backward()
    with torch.inference_mode(False), torch.enable_grad():
        m(x, mask)  # parameters need grad: no chunking either


def test_chunk_size_with_gradients_gives_the_same_gradients():
    m = block(starting=False)
    x, mask = pair(L=6)
    dout = torch.randn_like(x)
    results = []
    for chunk in (None, 2):
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = m(xg, mask, chunk_size=chunk)
        out.backward(dout)
        results.append([out.detach(), xg.grad, *(p.grad for p in m.parameters())])
    assert_chunked_equal(results[0][0], results[1][0])
    for a, b in zip(*results, strict=True):  # sums over rows in another order: close, not bitwise
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_chunk_size_must_be_a_positive_int(bad):
    m = block()
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        m(torch.randn(1, 3, 3, 8), chunk_size=bad)


# ---------------------------------------------------------------------------------------- lengths


def test_lengths_mask_is_the_padded_tail_pair_mask():
    got = lengths_mask(torch.tensor([3, 0, 4]), 4)
    for b, n in enumerate((3, 0, 4)):
        valid = torch.arange(4) < n
        assert torch.equal(got[b], valid[:, None] & valid[None, :])


def masked_then_zeroed(q, k, v, bias, lengths, mask=None, scale=None):
    """What lengths= promises: the call with the padded-tail key mask (and'ed with ``mask``), its padded
    (i, j) pairs then set to 0."""
    real = lengths_mask(lengths, q.shape[-2])
    out = fta.attention(q, k, v, bias, scale, mask=real if mask is None else mask & real)
    return out * real[:, None, :, :, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_lengths_equals_the_masked_call_with_padded_pairs_zeroed(dtype):
    B, H, L, D = 2, 2, 6, 16
    q, k, v = (torch.randn(B, H, L, L, D).to(dtype) for _ in range(3))
    bias = torch.randn(B, H, L, L).to(dtype)
    lengths = torch.tensor([6, 3])
    mask = (torch.rand(B, L, L) < 0.7) | torch.eye(L, dtype=torch.bool)
    got = fta.attention(q, k, v, bias, lengths=lengths)
    assert torch.equal(got, masked_then_zeroed(q, k, v, bias, lengths))
    assert not bool(got[1, :, :3, 3:].any()) and not bool(got[1, :, 3:].any())  # the padded pairs are 0
    assert bool(got[1, :, :3, :3].abs().sum() > 0)  # ... and the real ones are not
    assert torch.equal(fta.attention(q, k, v, bias, mask=mask, lengths=lengths),
                       masked_then_zeroed(q, k, v, bias, lengths, mask))
    assert torch.equal(fta.attention(q, k, v, bias, lengths=torch.tensor([L, L], dtype=torch.int32)),
                       fta.attention(q, k, v, bias))


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_attention_lengths_on_tiles_that_divide_l_ignore_what_the_padding_holds(rows):
    """L = 64 on tiles of 32 (EVEN_L): the forward keeps its unmasked loads with a padded tail and drops the tail's
    keys by their scores (kernels/forward.py). Tails inside a tile (40), on a tile's edge (32), none (64) and all
    (0): bitwise the masked call with padded pairs zeroed, also when the padded positions of q, k, v and the
    bias hold NaN (v past the real length is loaded masked, so 0 meets p = 0 there, not NaN)."""
    B, H, L, D = 4, 1, 64, 16
    q, k, v = (torch.randn(B, H, L, L, D) for _ in range(3))
    bias = torch.randn(B, H, L, L)
    lengths = torch.tensor([40, 32, 64, 0])
    real = lengths_mask(lengths, L)  # (B, i, j): i and j real
    padded_keys = ~real[:, None, :, :, None].expand(B, H, L, L, 1)
    dirty = [t.masked_fill(padded_keys, float("nan")) for t in (q, k, v)]
    dirty_bias = bias.masked_fill(~real[:, None], float("nan"))
    with ops.override(configs={"forward": ops.LaunchConfig(32, 32, 1, 1, rows=rows)}):
        assert ops._even(L, ops.launch_config("forward", L, D, torch.float32, q.device), False)
        got = fta.attention(q, k, v, bias, lengths=lengths)
        assert torch.equal(got, masked_then_zeroed(q, k, v, bias, lengths))
        assert torch.equal(fta.attention(*dirty, dirty_bias, lengths=lengths), got)


def _outputs_and_gradients(ins, dout, call):
    leaves = [t.clone().requires_grad_() for t in ins]
    out = call(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize("switches, rows", [
    ({"end_tile_select": True}, 1), ({"end_tile_select": True}, 2), ({"end_tile_select": True}, 4),
    ({"pad_bias_tiles": True}, 2), ({"end_tile_select": True, "pad_bias_tiles": True}, 4),
    ({"pad_bias_tiles_backward": True}, 1), ({"pad_bias_tiles_backward": True, "pad_bias_tiles": True}, 2),
    ({"fold_split_sum": True}, 1), ({"fold_bias_copy": True}, 2),
    ({"fold_split_sum": True, "fold_bias_copy": True, "pad_bias_tiles_backward": True}, 2),
], ids=["end_tile-rows1", "end_tile-rows2", "end_tile-rows4", "pad_bias-rows2", "both-rows4",
        "pad_bias_backward-rows1", "pad_bias_both-rows2", "fold_sum-rows1", "fold_copy-rows2", "folds_pad_bias-rows2"])
def test_kernel_switches_give_the_same_bits_as_without(switches, rows):
    """KernelOptions.end_tile_select (the forward's select only in the key tile holding the end; off by
    default), pad_bias_tiles (the forward reads a zero-padded copy of the bias, whole tiles, unmasked; on by
    default since v27), pad_bias_tiles_backward (dq and dk/dv read such a copy; off), fold_split_sum (dk/dv
    sums the bias gradient's 8 row splits here; off) and fold_bias_copy (dq writes dk/dv's key-major copy of the
    bias; off), PERF.md after v25, v27, v28 and v29: turned on, each gives bitwise the forward, its lse and the
    gradients of all five off, on a masked
    path (L = 19 on tiles of 16, with and without a padded tail) and on tiles that divide L (L = 64 on 32) with
    tails inside and on a tile's edge. The last case gives the bias as the block's projection lays it out before
    any copy, heads innermost ((B, L, L, H) permuted): a padded copy must not inherit that layout unnoticed;
    dk/dv read the key-major copy of the (padded) bias where rows is even."""
    gen = torch.Generator().manual_seed(rows)
    cases = [(19, 16, None, 1), (19, 16, [19, 7, 0, 16], 1), (64, 32, [40, 33, 64, 0], 1)]
    if any(name.startswith(("pad_bias", "fold_bias")) for name in switches):  # the layout matters to the copies
        cases.append((19, 16, [19, 7, 0, 16], 2))
    for L, tile, lengths, H in cases:
        q, k, v = (torch.randn(4, H, L, L, 16, generator=gen) for _ in range(3))
        bias = torch.randn(4, L, L, H, generator=gen).permute(0, 3, 1, 2) if H > 1 else \
            torch.randn(4, H, L, L, generator=gen)
        dout = torch.randn(4, H, L, L, 16, generator=gen)
        kw = {} if lengths is None else {"lengths": torch.tensor(lengths)}

        def call(*ins, kw=kw):
            return fta.attention(*ins, **kw)

        # dk/dv on the key-major copy of the bias with even rows (as the GPU configs run it), on the bias with odd.
        configs = {kernel: ops.LaunchConfig(tile, tile, 1, 1, rows=min(rows, 2) if kernel != "forward" else rows,
                                            key_major_bias=kernel == "dkdv" and rows % 2 == 0)
                   for kernel in ("forward", "dq", "dkdv")}
        extents = None if lengths is None else api.padded_extents(torch.tensor(lengths), L)
        with ops.override(configs=configs, end_tile_select=False, pad_bias_tiles=False,
                          pad_bias_tiles_backward=False):
            want = _outputs_and_gradients([q, k, v, bias], dout, call)
            want += ops.launch_forward(q, k, v, bias, None, 0.25, extents)  # the lse too: +inf on padded rows
            with ops.override(**switches):
                got = _outputs_and_gradients([q, k, v, bias], dout, call)
                got += ops.launch_forward(q, k, v, bias, None, 0.25, extents)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), (L, lengths, bias.stride())


# Tiles of 16 with L = 19: a padded tail that ends inside a tile (6, 0) and one that covers whole tiles (6),
# rows per program 1, 2 and 4 (a program's rows straddle the tail), lengths 0 and L, three splits of dbias.
_TAIL_CONFIGS = {
    "rows1": {"forward": (1,), "dq": (1,), "dkdv": (1,)},
    "rows2": {"forward": (2,), "dq": (2,), "dkdv": (2,)},
    "rows4": {"forward": (4,), "dq": (2,), "dkdv": (1,)},
}


@pytest.mark.parametrize("rows, masked", [("rows1", False), ("rows2", False), ("rows4", False), ("rows2", True)],
                         ids=["rows1", "rows2", "rows4", "rows2-mask"])
def test_attention_lengths_gradients_equal_the_masked_call(rows, masked):
    """Forward and all four gradients bitwise equal to :func:`masked_then_zeroed`'s, for tiles of 16 whose
    programs skip the padded tail (kernels/forward.py, kernels/backward.py), with and without a mask."""
    if not api._uses_triton(torch.device("cpu"), torch.float32):
        pytest.skip("the kernels' tiles: needs TRITON_INTERPRET=1")
    from flash_tt_attn import ops

    L, lengths = 19, [19, 6, 0]
    B, H, D = len(lengths), 1, 16
    torch.manual_seed(L)
    ins = [torch.randn(B, H, L, L, D) for _ in range(3)] + [torch.randn(B, H, L, L)]
    dout = torch.randn(B, H, L, L, D)
    lengths = torch.tensor(lengths)
    mask = (torch.rand(B, L, L) < 0.8) if masked else None
    configs = {kernel: ops.LaunchConfig(16, 16, 2, 1, rows=r[0]) for kernel, r in _TAIL_CONFIGS[rows].items()}
    configs["dbias"] = ops.LaunchConfig(16, 16, 2, 1)
    with ops.override(configs=configs, dbias_splits=3):
        got = _outputs_and_gradients(ins, dout, lambda *t: fta.attention(*t, 0.3, mask=mask, lengths=lengths))
        want = _outputs_and_gradients(ins, dout, lambda *t: masked_then_zeroed(*t, lengths, mask, 0.3))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert torch.equal(a, b), name


def test_attention_lengths_gradients_against_fp64():
    """The gradients of lengths= against the fp64 PyTorch reference of the same function (any path)."""
    B, H, L, D = 2, 1, 5, 16
    ins = [torch.randn(B, H, L, L, D) for _ in range(3)] + [torch.randn(B, H, L, L)]
    dout = torch.randn(B, H, L, L, D)
    lengths = torch.tensor([2, 5])
    got = _outputs_and_gradients(ins, dout, lambda *t: fta.attention(*t, lengths=lengths))
    real = lengths_mask(lengths, L)

    def reference(q, k, v, bias):
        return fta.reference.attention_reference(q, k, v, bias, mask=real) * real[:, None, :, :, None]

    want = _outputs_and_gradients([t.double() for t in ins], dout.double(), reference)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunk3"])
@pytest.mark.parametrize("starting", [True, False], ids=["start", "end"])
def test_module_lengths_runs_each_item_on_its_crop(starting, chunk):
    """The block with lengths= runs each item on its real crop x[b, :n, :n]: bitwise the block of that crop
    alone (the full-length item: the block of that item alone); at padded pairs the attention output is 0, so
    the block returns its output projection's bias there; chunked equals unchunked. Against the whole masked
    call the real pairs agree to rounding only: the crop's pair-bias projection (2 output channels) is a
    36-row matmul where the whole batch's call has 128 rows, and the CPU GEMM may round those differently.

    Sizes: every matmul of the chunked call has at least 16 rows (chunks of 3 rows of a 6- or 8-wide crop).
    torch's CPU Linear rounds a matmul of at most 11 rows differently from a taller one holding the same rows
    (measured with 2 threads, K = 8, N = 32: 1.8e-7 between a 3-row crop's 6-row chunk and its 9-row whole),
    so smaller chunks would test the CPU GEMM, not the block."""
    m = block(starting=starting)
    x, mask = pair(L=8)
    lengths = torch.tensor([8, 6])
    real = lengths_mask(lengths, 8)
    crop = x[1:2, :6, :6]  # item 1's real pairs; the ending node's transpose maps them onto themselves
    with torch.no_grad():
        got = m(x, lengths=lengths, chunk_size=chunk)
        assert_chunked_equal(got, m(x, lengths=lengths), "chunked lengths")
        assert torch.equal(got[:1], m(x[:1], chunk_size=chunk))
        assert torch.equal(got[1:2, :6, :6], m(crop, chunk_size=chunk))
        assert torch.equal(got[~real], m.mha.linear_o.bias.expand_as(got[~real]))
        torch.testing.assert_close(got[real], m(x, real, chunk_size=chunk)[real], rtol=1e-6, atol=1e-6)
        both = m(x, mask, chunk_size=chunk, lengths=lengths)
        assert torch.equal(both[1:2, :6, :6], m(crop, mask[1:2, :6, :6], chunk_size=chunk))
        torch.testing.assert_close(both[real], m(x, mask & real, chunk_size=chunk)[real], rtol=1e-6, atol=1e-6)
        ref = block(fta.TriangleAttentionReference, starting=starting)
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(ref(x, lengths=lengths, chunk_size=chunk), got, rtol=1e-4, atol=1e-4)


def test_module_lengths_crop_computes_real_pairs_only():
    """The dense layers of a lengths= call see the real pairs only (6·6 + 3·3 rows, not 2·6·6), and a batch
    without padding (every length L) runs as one call."""
    m = block()
    x, _ = pair(L=6)
    rows = []
    m.mha.linear_q.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        m(x, lengths=torch.tensor([6, 3]))
        assert rows == [36, 9]
        rows.clear()
        m(x, lengths=torch.tensor([6, 0]))
        assert rows == [36]
        rows.clear()
        m(x, lengths=torch.tensor([6, 6]))
        assert rows == [72]


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole", "chunk2"])
def test_module_lengths_items_write_into_the_output(monkeypatch, chunk):
    """Each item of a lengths= call writes its crop's output into the batch's output (chunk by chunk when
    chunked) rather than into a tensor of its own that is then copied: the item's output is never held
    twice (PERF.md v27; at B=2 L=4096 the copy was 4 GiB of peak memory). Where the target is contiguous (a
    full-length item, or its chunk of rows at B=1) the output projection's addmm writes it directly (PERF.md
    v34); a cropped item's target is a strided view, which gets a copy."""
    m = block()
    x, _ = pair(L=6)
    targets, addmm_targets = [], []
    projection, addmm = m._output_projection, torch.addmm
    monkeypatch.setattr(m, "_output_projection", lambda o, out=None: targets.append(out) or projection(o, out))
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: addmm_targets.append(kw["out"]) or addmm(*a, **kw))
    with torch.no_grad():
        got = m(x, lengths=torch.tensor([6, 3]), chunk_size=chunk)
    same_storage = [t is not None and t.untyped_storage().data_ptr() == got.untyped_storage().data_ptr()
                    for t in targets]
    assert len(targets) == (2 if chunk is None else 3 + 2) and all(same_storage)
    contiguous = [t for t in targets if t.is_contiguous()]  # the full-length item's (1 or 3), a crop's 1-row chunk
    assert len(contiguous) == (1 if chunk is None else 4)
    assert [(t.data_ptr(), t.shape) for t in addmm_targets] == [(t.data_ptr(), t.view(-1, 8).shape) for t in contiguous]
    assert torch.equal(got[:1], m(x[:1], chunk_size=chunk))
    assert torch.equal(got[1:2, :3, :3], m(x[1:2, :3, :3], chunk_size=chunk))


@pytest.mark.parametrize("starting", [True, False], ids=["start", "end"])
def test_module_lengths_under_compile_reach_the_kernels(monkeypatch, starting):
    """Under torch.compile (lengths cannot be read on the host) the whole batch runs with lengths= passed to
    the kernels: bitwise the masked call at the real pairs, the output projection's bias at the padded ones,
    and its gradients those of the masked call at the real pairs."""
    m = block(starting=starting)
    x, _ = pair(L=6)
    lengths = torch.tensor([6, 3])
    real = lengths_mask(lengths, 6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        got = m(x, lengths=lengths)
        assert torch.equal(got[real], m(x, real)[real])
        assert torch.equal(got[~real], m.mha.linear_o.bias.expand_as(got[~real]))
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(m(x, lengths=lengths), got, rtol=1e-6, atol=1e-6)


def test_module_lengths_gradients_equal_the_masked_call():
    """Training with lengths= (the crop path): the gradients of x and of every parameter are those of the
    masked call with its padded pairs' output replaced by the output projection's bias (to rounding). The
    plain masked call is not the reference there: its mask leaves keys out, so a padded query j of a real row
    still attends the real keys, and its output (and gradient) reaches real pairs."""
    m = block()
    x, _ = pair(L=6)
    lengths = torch.tensor([6, 3])
    real = lengths_mask(lengths, 6)
    dout = torch.randn(2, 6, 6, 8)

    def grads(call):
        xg = x.clone().requires_grad_()
        m.zero_grad()
        call(xg).backward(dout)
        return [xg.grad] + [p.grad.clone() for p in m.parameters()]

    def masked_then_padded_pairs_replaced(xg):
        return torch.where(real[..., None], m(xg, real), m.mha.linear_o.bias)

    got = grads(lambda xg: m(xg, lengths=lengths))
    for a, b in zip(got, grads(masked_then_padded_pairs_replaced), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths, error, match", [
    pytest.param([2, 3], TypeError, "must be a torch.Tensor", id="list"),
    pytest.param(torch.tensor([2.0, 3.0]), TypeError, "integer tensor", id="float"),
    pytest.param(torch.tensor([True, False]), TypeError, "integer tensor", id="bool"),
    pytest.param(torch.tensor([2]), ValueError, r"shape \(B,\) = \(2,\), got \(1\)", id="shape"),
    pytest.param(torch.tensor([[2, 3]]), ValueError, r"shape \(B,\)", id="dims"),
    pytest.param(torch.tensor([2, -1]), ValueError, r"in \[0, L\] = \[0, 4\]", id="negative"),
    pytest.param(torch.tensor([2, 5]), ValueError, r"in \[0, L\] = \[0, 4\]", id="too-long"),
    pytest.param(torch.tensor([2, 3], device="meta"), ValueError, "lengths is on meta", id="device"),
])
def test_lengths_validation(lengths, error, match):
    q = torch.randn(2, 1, 4, 4, 16)
    with pytest.raises(error, match=match) as info:
        fta.attention(q, q, q, torch.randn(2, 1, 4, 4), lengths=lengths)
    assert "attention()" in str(info.value)
    m = block()
    with pytest.raises(error, match="TriangleAttention.forward()"):
        m(torch.randn(2, 4, 4, 8), lengths=lengths)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_lengths_on_the_cpu_give_the_bits_of_lengths_on_the_gpu():
    """lengths= may stay on the CPU (no wait for the device to read them): the block (eager and compiled) and
    attention() give the same bits as with the lengths on the GPU."""
    m = block(c_in=128, c_hidden=32, heads=4).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 96, 96, 128, device="cuda", dtype=torch.bfloat16)
    on_cpu = torch.tensor([96, 50])
    with torch.no_grad():
        assert torch.equal(m(x, lengths=on_cpu), m(x, lengths=on_cpu.cuda()))
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)
        assert torch.equal(compiled(x, lengths=on_cpu), compiled(x, lengths=on_cpu.cuda()))
    q, k, v = (torch.randn(2, 4, 96, 96, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, 4, 96, 96, device="cuda", dtype=torch.bfloat16)
    got, want = fta.attention(q, k, v, bias, lengths=on_cpu), fta.attention(q, k, v, bias, lengths=on_cpu.cuda())
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------- bench providers


@pytest.mark.parametrize("name", ["flash_tt_attn", "flash_tt_attn_whole", "naive_chunk4", "naive_chunk128",
                                  "flash_tt_attn_lengths", "flash_tt_attn_host_lengths"])
def test_block_providers_of_the_long_inference_spec_run_on_cpu(name):
    from flash_tt_attn.bench.measure import make_call
    from flash_tt_attn.bench.providers import get_provider
    from flash_tt_attn.bench.spec import Point

    provider = get_provider("triangle_block", name)
    provider.load(torch.device("cpu"))
    for mode in ("fwd", "fwd_bwd"):
        point = Point("t", "triangle_block", name, 2, 2, 6, 16, "float32", mode, c_in=8, node="ending")
        call, leaves = make_call(point, provider, torch.device("cpu"))
        out = call()
        if mode == "fwd":
            assert out.shape == (2, 6, 6, 8) and bool(torch.isfinite(out).all())
        else:
            assert leaves[0].grad is not None


def test_cueq_block_provider_wires_cuequivariance_layouts():
    """cueq needs CUDA: a stand-in with cuEquivariance's signature and layouts (q, k, v (B, N, H, Q, D),
    bias (B, 1, H, Q, K), mask (B, N, 1, 1, K)) computing our attention must give our block's output."""
    from flash_tt_attn.bench.providers import CueqBlock, Unsupported, get_provider

    with pytest.raises(Unsupported, match="CUDA"):
        get_provider("triangle_block", "cueq").load(torch.device("cpu"))
    calls = []

    def fake(q, k, v, bias, mask=None, scale=None):
        B, N, H, Q, D = q.shape
        assert bias.shape == (B, 1, H, Q, Q) and (mask is None or mask.shape == (B, N, 1, 1, Q))
        calls.append(N)
        t = [x.transpose(1, 2) for x in (q, k, v)]
        m = None if mask is None else mask[:, :, 0, 0, :]
        return api.run_attention(*t, bias[:, 0], scale, m).transpose(1, 2)

    provider = CueqBlock("cueq", fn=fake)
    provider.load(torch.device("cpu"))
    for starting in (True, False):
        torch.manual_seed(1)
        ours = block(starting=starting)
        cueq = provider.build(8, 16, 2, starting=starting)
        cueq.load_state_dict(ours.state_dict())
        x, mask = pair(L=6)
        with torch.no_grad():
            assert torch.equal(cueq(x, mask, chunk_size=4), ours(x, mask, chunk_size=4))
    assert calls == [4, 2, 4, 2]
