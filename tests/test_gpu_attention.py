"""GPU tests of attention(): dtypes, head dims and lengths on the Triton kernels, determinism,
torch.library.opcheck, torch.compile and CUDA graphs. Skipped without CUDA (run by `nox -s gpu_tests`)."""

import pytest
import torch
from helpers import forward_and_grads
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import attention, ops, tuning
from flash_tt_attn.api import lengths_mask
from flash_tt_attn.reference import attention_chunked

pytestmark = pytest.mark.gpu

# Relative-norm bounds: fp16 / bf16 rounding of P and of the outputs, fp32 with IEEE products.
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _inputs(B, H, L, D, dtype, masked, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, L, D, device="cuda", generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(B, H, L, L, device="cuda", generator=g).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L, L, device="cuda", generator=g) > 0.2
        mask[0, 0] = False
    return q, k, v, bias, mask


CASES = [
    pytest.param(2, 3, 33, 16, torch.float16, True, id="B2-H3-L33-D16-fp16-mask"),
    pytest.param(1, 2, 100, 32, torch.bfloat16, True, id="B1-H2-L100-D32-bf16-mask"),
    pytest.param(1, 2, 129, 64, torch.float16, False, id="B1-H2-L129-D64-fp16"),
    pytest.param(1, 1, 96, 128, torch.bfloat16, True, id="B1-H1-L96-D128-bf16-mask"),
    pytest.param(1, 2, 77, 32, torch.float32, True, id="B1-H2-L77-D32-fp32-mask"),
    pytest.param(1, 1, 64, 128, torch.float32, False, id="B1-H1-L64-D128-fp32"),
    pytest.param(1, 2, 512, 32, torch.float16, False, id="B1-H2-L512-D32-fp16"),
    pytest.param(1, 1, 1024, 32, torch.bfloat16, True, id="B1-H1-L1024-D32-bf16-mask"),
]


@pytest.mark.parametrize("B,H,L,D,dtype,masked", CASES)
def test_kernels_match_fp64_reference(B, H, L, D, dtype, masked):
    q, k, v, bias, mask = _inputs(B, H, L, D, dtype, masked)
    dout = torch.randn_like(q)
    got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    want = forward_and_grads(attention_chunked, *(t.double() for t in (q, k, v, bias)), dout.double(), mask=mask,
                  chunk_rows=16)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err <= TOL[dtype], f"{name}: {err:.2e}"


GPU_SHARED_MEMORY = {"A100": 166_912, "L4": 101_376}  # bytes per program, as Triton reports them


@pytest.mark.parametrize("gpu", GPU_SHARED_MEMORY)
@pytest.mark.parametrize("B,H,L,D,dtype,masked", [CASES[2], CASES[3]])
def test_configs_for_gpus_with_less_shared_memory(gpu, B, H, L, D, dtype, masked):
    """The configs an A100 or an L4 gets in place of the H100's larger ones (tuning.TABLE's large), run here."""
    with ops.override(shared_memory_per_program=GPU_SHARED_MEMORY[gpu]):
        with set_wrap_triton_enabled(False):  # as inside the custom op's eager call
            chosen = [ops.launch_config(kernel, L, D, dtype, torch.device("cuda")) for kernel in tuning.KERNELS]
        assert all(cfg != entry.large.config for cfg in chosen for entry in tuning.TABLE.values()
                   if entry.large is not None and entry.large.shared_memory > GPU_SHARED_MEMORY[gpu])
        test_kernels_match_fp64_reference(B, H, L, D, dtype, masked)


def test_backward_is_bitwise_deterministic_over_20_calls():
    q, k, v, bias, mask = _inputs(2, 4, 160, 32, torch.float16, True)
    dout = torch.randn_like(q)
    first = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    for _ in range(19):
        again = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_opcheck():
    q, k, v, bias, mask = _inputs(1, 2, 40, 32, torch.float16, True)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, mask, 0.3))
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, None, 0.3))


@pytest.mark.parametrize("D", [32, 64, 128])
def test_compile_fullgraph_matches_eager(D):
    """Also at D = 64 and 128, whose config choosers ask the GPU for its shared memory (tuning.TABLE's large configs)
    while torch.compile traces the launch, and where a traced launch takes uncapped tiles in place of eager's
    register-capped ones (tuning.Entry.when_traced): the bits must still match."""
    q, k, v, bias, mask = _inputs(1, 2, 64, D, torch.bfloat16, True)
    dout = torch.randn_like(q)
    compiled = torch.compile(attention, fullgraph=True)
    got = forward_and_grads(compiled, q, k, v, bias, dout, mask=mask)
    want = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    # The same kernels with the same arguments: the kernels cast the scale to fp32, which Inductor's launch
    # passes as fp64 (kernels/common.py), so the results are bitwise equal, not just close.
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 32), (torch.float16, 64), (torch.float32, 32)],
                         ids=["bf16-D32", "fp16-D64", "fp32-D32"])
def test_lengths_skip_padding_and_match_the_masked_call(dtype, D):
    """The GPU's tiles (64-128 wide, 2-4 rows per program) against a padded tail that ends inside a tile, one
    that covers whole tiles and an empty sequence: forward and gradients against the fp64 masked call whose padded
    pairs are zeroed, padded pairs exactly 0, and (bf16) torch.compile(fullgraph=True) bitwise equal to eager.

    Not bitwise against our own masked call here, unlike under the interpreter (tests/test_chunking.py): on the
    GPU the masked call's extra, fully masked key blocks rescale the row by exp2 of a rounding error (the compiler
    contracts m·log2(e) - m_shift into one FMA), where a skipped block rescales nothing."""
    q, k, v, bias, _ = _inputs(3, 2, 200, D, dtype, False)
    dout = torch.randn_like(q)
    lengths = torch.tensor([200, 77, 0], device="cuda")
    real = lengths_mask(lengths, 200)

    def masked_then_zeroed(q, k, v, bias):
        return attention_chunked(q, k, v, bias, mask=real, chunk_rows=16) * real[:, None, :, :, None]

    got = forward_and_grads(attention, q, k, v, bias, dout, lengths=lengths)
    want = forward_and_grads(masked_then_zeroed, *(t.double() for t in (q, k, v, bias)), dout.double())
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err <= TOL[dtype], f"{name}: {err:.2e}"
    assert not got[0][~real[:, None, :, :, None].expand_as(got[0])].any()  # padded pairs: exactly 0
    if dtype != torch.bfloat16:  # one compiled case is enough: each compile takes the host tens of seconds
        return
    compiled = forward_and_grads(torch.compile(attention, fullgraph=True), q, k, v, bias, dout, lengths=lengths)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), compiled, got, strict=True):
        assert torch.equal(g, w), f"compiled {name}"


@pytest.mark.parametrize("D", [32, 128])
def test_cuda_graph_replay_gives_the_eager_bits(D):
    """Small calls are bound by the host's launch work (docs/performance.md), which a CUDA graph removes: a
    forward+backward captured once and replayed on new values in the same tensors gives the eager call's bits.
    D = 128 also asks the GPU for its shared memory while choosing tiles (tuning.TABLE's large configs)."""
    q, k, v, bias, mask = _inputs(1, 2, 64, D, torch.bfloat16, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    dout = torch.randn_like(q)

    def step():
        out = attention(*leaves, mask=mask)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step()
    fresh = _inputs(1, 2, 64, D, torch.bfloat16, True, seed=1)[:4]
    fresh_dout = torch.randn_like(dout)
    with torch.no_grad():
        for leaf, value in zip(leaves, fresh, strict=True):
            leaf.copy_(value)
        dout.copy_(fresh_dout)
    graph.replay()
    want = forward_and_grads(attention, *fresh, fresh_dout, mask=mask)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), replayed, want, strict=True):
        assert torch.equal(g, w), name


def test_compile_reduce_overhead_gives_the_eager_bits():
    """torch.compile(mode="reduce-overhead") replays the calls from CUDA graphs (cudagraph trees) on its own:
    the same bits as eager, forward and gradients."""
    q, k, v, bias, mask = _inputs(1, 2, 64, 32, torch.bfloat16, True)
    dout = torch.randn_like(q)
    compiled = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, then recording; the third call replays
        got = forward_and_grads(compiled, q, k, v, bias, dout, mask=mask)
    want = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("switches", [
    {"fold_split_sum": True}, {"fold_bias_copy": True}, {"fold_split_sum": True, "fold_bias_copy": True},
    {"pad_bias_tiles_backward": True},
], ids=["fold_split_sum", "fold_bias_copy", "folds", "pad_bias_tiles_backward"])
def test_backward_switches_give_the_same_bits_on_the_gpu(switches):
    """KernelOptions' backward switches (v28, v29) with the GPU's own configs, at the training shapes (B=1, H=4,
    D=32, bf16, where the bias gradient is split over rows and dk/dv reads a key-major bias copy): L = 256 with a
    mask, L = 200 with a padded tail and the block's heads-innermost bias, L = 1000 (tiles do not divide it, so
    pad_bias_tiles_backward pads the bias) eager and under torch.compile(fullgraph=True). Turned on, each gives
    the forward and all four gradients bitwise as with every backward switch off."""
    off = {"fold_split_sum": False, "fold_bias_copy": False, "pad_bias_tiles_backward": False}
    for L, masked, lengths, heads_innermost in [(256, True, None, False), (200, False, [150], True),
                                                (1000, False, None, False)]:
        q, k, v, bias, mask = _inputs(1, 4, L, 32, torch.bfloat16, masked)
        if heads_innermost:  # the layout the block's bias projection gives before any copy
            bias = bias.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        dout = torch.randn_like(q)
        kw = {"mask": mask} if lengths is None else {"lengths": torch.tensor(lengths, device="cuda")}
        with ops.override(**off):
            want = forward_and_grads(attention, q, k, v, bias, dout, **kw)
            with ops.override(**switches):
                got = forward_and_grads(attention, q, k, v, bias, dout, **kw)
                if L == 1000:
                    torch._dynamo.reset()  # trace under these switches, not from a cached graph of other tests
                    compiled = forward_and_grads(torch.compile(attention, fullgraph=True), q, k, v, bias, dout, **kw)
                else:
                    compiled = got
        for name, g, c, w in zip(("out", "dq", "dk", "dv", "dbias"), got, compiled, want, strict=True):
            assert torch.equal(g, w), (L, name)
            assert torch.equal(c, w), (L, "compiled", name)
