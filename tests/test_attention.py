"""The public attention() against the fp64 definition (reference.attention_reference).

On a CPU-only machine conftest.py switches on Triton's interpreter, so these tests run
the real kernels; shapes are tiny because the interpreter is slow. GPU-only tests are
in tests/test_gpu_attention.py.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import forward_and_grads
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from flash_tt_attn import attention, ops, tuning
from flash_tt_attn.reference import attention_chunked, attention_reference

DTYPE_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.float64: 1e-12}


def make_inputs(B, H, L, D, dtype, masked=False, scale_bias=1.0):
    q, k, v = (torch.randn(B, H, L, L, D).to(dtype) for _ in range(3))
    bias = (scale_bias * torch.randn(B, H, L, L)).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L, L) > 0.3
        mask[0, 0] = False  # row i = 0 of batch 0: every key excluded
    return q, k, v, bias, mask


def reference_fp64(q, k, v, bias, dout, **kwargs):
    return forward_and_grads(attention_reference, *(t.double() for t in (q, k, v, bias)), dout.double(), **kwargs)


def assert_close_to_reference(got, want, dtype, names=("out", "dq", "dk", "dv", "dbias")):
    tol = DTYPE_TOL[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
        err = (g.double() - w).norm() / w.norm().clamp_min(1.0)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


CASES = [
    pytest.param(1, 1, 1, 16, torch.float32, False, id="B1-H1-L1-D16-fp32"),
    pytest.param(2, 2, 5, 16, torch.float32, True, id="B2-H2-L5-D16-fp32-mask"),
    pytest.param(1, 2, 16, 32, torch.float16, False, id="B1-H2-L16-D32-fp16"),
    pytest.param(1, 1, 16, 16, torch.float16, True, id="B1-H1-L16-D16-fp16-mask"),
    pytest.param(1, 1, 33, 16, torch.float32, True, id="B1-H1-L33-D16-fp32-mask"),
    pytest.param(1, 1, 7, 32, torch.float64, True, id="B1-H1-L7-D32-fp64-mask"),
]


@pytest.mark.parametrize("B,H,L,D,dtype,masked", CASES)
def test_forward_and_gradients_match_fp64_reference(B, H, L, D, dtype, masked):
    q, k, v, bias, mask = make_inputs(B, H, L, D, dtype, masked)
    dout = torch.randn(B, H, L, L, D).to(dtype)
    scale = 0.37
    got = forward_and_grads(attention, q, k, v, bias, dout, scale=scale, mask=mask)
    want = reference_fp64(q, k, v, bias, dout, scale=scale, mask=mask)
    assert_close_to_reference(got, want, dtype)


def test_fp16_error_is_within_twice_pytorch_fp16_error():
    """flash-attention's rule: the kernel's error is at most 2x that of the same math in fp16 PyTorch."""
    q, k, v, bias, _ = make_inputs(1, 2, 12, 16, torch.float16)
    dout = torch.randn_like(q)
    want = reference_fp64(q, k, v, bias, dout)
    ours = forward_and_grads(attention, q, k, v, bias, dout)
    torch_fp16 = forward_and_grads(lambda *a: attention_reference(*(t.float() for t in a)).half(), q, k, v, bias,
                                   dout)
    for name, a, b, w in zip(("out", "dq", "dk", "dv", "dbias"), ours, torch_fp16, want, strict=True):
        err_ours = (a.double() - w).norm() / w.norm()
        err_torch = (b.half().double() - w).norm() / w.norm()
        assert err_ours <= 2 * err_torch + 1e-4, f"{name}: {err_ours:.2e} vs PyTorch fp16 {err_torch:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scale_above_one(dtype):
    """fp16 with |scale| > 1 takes the kernels' other path (scale on the fp32 product, not on q)."""
    q, k, v, bias, mask = make_inputs(1, 2, 6, 16, dtype, masked=True)
    dout = torch.randn_like(q)
    got = forward_and_grads(attention, q * 0.3, k * 0.3, v, bias, dout, scale=1.7, mask=mask)
    want = reference_fp64(q * 0.3, k * 0.3, v, bias, dout, scale=1.7, mask=mask)
    assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("shape", [(0, 2, 4, 4, 16), (1, 2, 0, 0, 16)], ids=["B0", "L0"])
def test_empty_inputs_give_empty_outputs_and_zero_bias_gradient(shape):
    q = torch.randn(shape, requires_grad=True)
    k, v = (torch.randn(shape, requires_grad=True) for _ in range(2))
    bias = torch.randn(shape[:4], requires_grad=True)
    out = attention(q, k, v, bias)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=True)
    assert all(g is None or (g.shape == t.shape and not g.any()) for g, t in zip(grads, (q, k, v, bias), strict=True))


def test_row_block_op_with_no_rows():
    """An empty shard of rows (R = 0): empty output, zero bias gradient."""
    q = torch.randn(1, 2, 0, 5, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 0, 5, 16, requires_grad=True) for _ in range(2))
    bias = torch.randn(1, 2, 5, 5, requires_grad=True)
    out, lse = ops.attention_fwd(q, k, v, bias, None, 0.25)
    assert out.shape == q.shape and lse.shape == (1, 2, 0, 5)
    dbias = torch.autograd.grad(out.sum(), bias, allow_unused=True)[0]
    assert dbias is None or not dbias.any()


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, bias, _ = make_inputs(1, 1, 6, 16, torch.float32)
    got = attention(q, k, v, bias)
    want = attention_reference(q.double(), k.double(), v.double(), bias.double(), scale=1 / math.sqrt(16))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_seed_usage_example_runs():
    """The seed README's example, on this machine's device, with its positional scale."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, heads, seq_len, head_dim = 1, 2, 8, 32
    q = torch.randn(batch, heads, seq_len, seq_len, head_dim, dtype=torch.float16, device=device)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    bias = torch.randn(batch, heads, seq_len, seq_len, dtype=torch.float16, device=device)
    scale = 1.0 / (head_dim**0.5)
    output = attention(q, k, v, bias, scale)
    assert output.shape == q.shape and output.dtype == q.dtype
    want = attention_reference(q.double(), k.double(), v.double(), bias.double(), scale)
    assert (output.double() - want).norm() / want.norm() < 3e-3


def test_fully_masked_row_gives_zero_output_and_zero_gradients():
    q, k, v, bias, mask = make_inputs(1, 2, 6, 16, torch.float32, masked=True)
    mask[0, 3] = False
    ins = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*ins, mask=mask)
    dq, dk, dv, dbias = torch.autograd.grad(out, ins, torch.randn_like(out))
    for t in (out, dq, dk, dv, dbias):
        assert torch.isfinite(t).all()
    for row in (0, 3):
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        for g in (dq, dk, dv):
            assert torch.equal(g[:, :, row], torch.zeros_like(g[:, :, row]))


def test_large_negative_bias_excludes_keys():
    """A bias of -1e4 on a key gives it weight exp(-1e4) = 0: same as masking it."""
    q, k, v, bias, _ = make_inputs(1, 1, 7, 16, torch.float32)
    keys_off = torch.tensor([1, 4])
    bias[..., keys_off] = -1e4
    mask = torch.ones(1, 7, 7, dtype=torch.bool)
    mask[..., keys_off] = False
    torch.testing.assert_close(attention(q, k, v, bias), attention(q, k, v, bias, mask=mask), rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs():
    """Permuted views of (B, L, L, H, D) storage, as AlphaFold-style models hold pair tensors."""
    B, L, H, D = 1, 9, 2, 16
    q, k, v = (torch.randn(B, L, L, H, D).permute(0, 3, 1, 2, 4) for _ in range(3))
    bias = torch.randn(B, L, L, H).permute(0, 3, 1, 2)
    assert not q.is_contiguous()
    dout = torch.randn(B, H, L, L, D)
    got = forward_and_grads(attention, q, k, v, bias, dout)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout), torch.float32)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("pipeline_all_loads", [False, True])
def test_every_rows_per_program_variant_of_the_forward(monkeypatch, rows, pipeline_all_loads):
    """The forward handles 1, 2 or 4 rows i per program; L = 5 leaves a partial last group."""
    cfg = ops.LaunchConfig(16, 16, 1, 2, rows=rows, pipeline_all_loads=pipeline_all_loads)
    q, k, v, bias, mask = make_inputs(1, 2, 5, 16, torch.float32, masked=True)
    want = attention_reference(q.double(), k.double(), v.double(), bias.double(), 0.5, mask)
    with ops.override(configs={"forward": cfg}):
        got = attention(q, k, v, bias, 0.5, mask=mask)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("pipeline_all_loads", [False, True])
def test_every_rows_per_program_variant_of_the_backward(monkeypatch, rows, pipeline_all_loads):
    """dq and dk/dv kernels handle 1 or 2 rows i per program; L = 5 leaves a lone last row."""
    cfg = ops.LaunchConfig(16, 16, 1, 2, rows=rows, pipeline_all_loads=pipeline_all_loads)
    q, k, v, bias, mask = make_inputs(1, 2, 5, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    with ops.override(configs={"dq": cfg, "dkdv": cfg, "dbias": cfg}):
        got = forward_and_grads(attention, q, k, v, bias, dout, scale=0.5, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, scale=0.5, mask=mask), torch.float32)


def test_configs_that_leave_the_operand_unscaled(monkeypatch):
    """prescale=False (the GPU's D = 64 and 128 configs): forward, dq and dk/dv apply the scale to the fp32
    product instead of scaling q (k in dk/dv) in its own dtype; the results must not change."""
    unscaled = ops.LaunchConfig(16, 16, 1, 2, pipeline_all_loads=True, prescale=False)
    common = dict(ops.backward_constants(torch.float32, torch.device("cpu"), 16, False, 0.25))
    assert common["Q_PRESCALED"] and not ops._prescaled(common, unscaled)["Q_PRESCALED"]
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    with ops.override(configs={"forward": unscaled, "dq": unscaled, "dkdv": unscaled}):
        got = forward_and_grads(attention, q, k, v, bias, dout, scale=0.25, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, scale=0.25, mask=mask), torch.float32)


@pytest.mark.parametrize("bias_view", ["row_major", "transposed_view"])
def test_dkdv_reading_a_key_major_copy_of_the_bias(monkeypatch, bias_view):
    """key_major_bias: dk/dv read bias[j, k] through a key-major copy (none is made when the bias already
    is key-major, as the ending node's transposed view is); the gradients must not change."""
    cfg = ops.LaunchConfig(16, 16, 1, 2, key_major_bias=True, max_registers=128)  # a launch option only
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float32, masked=True)
    if bias_view == "transposed_view":
        bias = bias.mT.contiguous().mT
        assert bias.stride(-2) == 1 and bias.clone().stride(-2) == 1  # forward_and_grads clones it
    dout = torch.randn_like(q)
    with ops.override(configs={"dkdv": cfg}):
        got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float32)


@pytest.mark.parametrize("fold", [False, True], ids=["sum_kernel", "folded"])
def test_fold_split_sum_leaves_out_the_sum_kernel(monkeypatch, fold):
    """KernelOptions.fold_split_sum: where the bias gradient is split over rows, dk/dv adds the partial sums up
    and the backward launches three kernels instead of four; one split needs no sum either way. The gradients
    equal the fp64 reference (bitwise equality with the sum kernel: tests/test_chunking.py's switch test)."""
    launched = []
    launch = ops._launch
    monkeypatch.setattr(ops, "_launch", lambda kernel, *a: (launched.append(kernel.fn.__name__), launch(kernel, *a)))
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    for splits in (3, 1):
        launched.clear()
        with ops.override(fold_split_sum=fold, dbias_splits=splits):
            got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
        summed = ["sum_row_splits_kernel"] if splits > 1 and not fold else []
        assert sorted(launched) == sorted(["attention_fwd_kernel", "attention_bwd_dq_kernel",
                                           "attention_bwd_dkdv_kernel", "attention_bwd_dbias_kernel", *summed])
        assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float32)


@pytest.mark.parametrize("bias_view", ["row_major", "transposed_view"])
def test_fold_bias_copy_has_dq_write_the_copy_dkdv_reads(monkeypatch, bias_view):
    """KernelOptions.fold_bias_copy: where dk/dv reads a key-major copy of the bias that has to be made, the dq
    kernel writes it (its last tensor argument) and dk/dv reads that very tensor, key-major and equal to the
    bias; a bias that already is key-major (the ending node's transposed view) is read as it is, no copy. The
    gradients equal the fp64 reference (bitwise equality with the switch off: tests/test_chunking.py)."""
    launched = {}
    launch = ops._launch
    monkeypatch.setattr(ops, "_launch", lambda kernel, plan, tensors: (
        launched.setdefault(kernel.fn.__name__, tensors), launch(kernel, plan, tensors)))
    cfg = ops.LaunchConfig(16, 16, 1, 2, key_major_bias=True)
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float32, masked=True)
    if bias_view == "transposed_view":
        bias = bias.mT.contiguous().mT
    dout = torch.randn_like(q)
    with ops.override(configs={"dkdv": cfg}, fold_bias_copy=True):
        got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float32)
    dq_tensors, dkdv_bias = launched["attention_bwd_dq_kernel"], launched["attention_bwd_dkdv_kernel"][3]
    assert dkdv_bias.stride()[-2:] == (1, 7) and torch.equal(dkdv_bias, bias)
    if bias_view == "row_major":
        assert dkdv_bias is dq_tensors[-1]
    else:
        assert dq_tensors[-1] is dq_tensors[-2]  # the unused argument gets dq itself
        assert dkdv_bias.data_ptr() == dq_tensors[3].data_ptr()  # the bias dq read


def test_traced_launches_of_register_capped_configs_run_serialized():
    """torch.compile's traced launches cannot carry maxnreg: a config that settles its accumulators under a
    register cap runs serialized there (same bits, fewer registers); eager launches keep both."""
    capped = ops.LaunchConfig(64, 64, 4, 3, max_registers=168)
    uncapped = ops.LaunchConfig(64, 64, 4, 3)
    gpu = torch.device("cuda")  # a device object only: nothing runs
    with set_wrap_triton_enabled(False):  # as inside the custom op's eager call
        assert ops._settle(torch.float16, gpu, capped) and ops._launch_options(capped)["maxnreg"] == 168
    with set_wrap_triton_enabled(True):  # as while torch.compile traces the launch
        assert not ops._settle(torch.float16, gpu, capped) and "maxnreg" not in ops._launch_options(capped)
        assert ops._settle(torch.float16, gpu, uncapped)
    assert not ops._settle(torch.float64, gpu, uncapped) and not ops._settle(torch.float16, torch.device("cpu"),
                                                                           uncapped)


@pytest.mark.parametrize("max_shared_memory", [232_448, 166_912, 101_376], ids=["H100", "A100", "L4"])
def test_configs_needing_more_shared_memory_than_the_gpu_has_are_not_chosen(max_shared_memory):
    """The tuning table's large configs are chosen only where the GPU's shared memory per program (its limit
    as Triton reports it) holds them: every one of them on an H100, where they were tuned, none on an L4."""
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs
    larges = [(kernel, head_dims, entry.large) for (kernel, head_dims, _), entry in tuning.TABLE.items()
              if entry.large is not None]
    assert {(kernel, head_dims) for kernel, head_dims, _ in larges} == {
        ("forward", "128"), ("dq", "128"), ("dbias", "64"), ("dbias", "128")}
    for kernel, head_dims, (large, needed) in larges:
        head_dim = 128 if head_dims == "128" else 64
        for dtype in (torch.float16, torch.bfloat16):
            with ops.override(shared_memory_per_program=max_shared_memory), set_wrap_triton_enabled(False):
                chosen = ops.launch_config(kernel, 512, head_dim, dtype, gpu)
            assert (chosen == large) == (needed <= max_shared_memory), (kernel, head_dim, dtype)


@pytest.mark.parametrize("kernel,head_dim", [("forward", 32), ("forward", 64), ("dq", 128)])
def test_traced_launches_of_register_capped_tiles_get_uncapped_ones(kernel, head_dim):
    """Tiles that rely on a register cap, which a traced launch (torch.compile) cannot carry: traced launches get
    uncapped tiles with the same key blocks and arithmetic per query (for dq at D = 128, the tiles that GPUs
    with less shared memory get)."""
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs
    with ops.override(shared_memory_per_program=232_448):  # an H100's
        with set_wrap_triton_enabled(False):
            eager = ops.launch_config(kernel, 512, head_dim, torch.bfloat16, gpu)
        with set_wrap_triton_enabled(True):
            traced = ops.launch_config(kernel, 512, head_dim, torch.bfloat16, gpu)
    assert eager.max_registers is not None and traced.max_registers is None
    assert (traced.block_k, traced.prescale, traced.rows) == (eager.block_k, eager.prescale, eager.rows)
    if (kernel, head_dim) == ("dq", 128):
        assert eager == tuning.TABLE["dq", "128", "16-bit"].large.config
        with ops.override(shared_memory_per_program=101_376), set_wrap_triton_enabled(False):  # an L4's
            assert ops.launch_config(kernel, 512, head_dim, torch.bfloat16, gpu) == traced


def test_bias_gradient_on_tiles_wider_than_tall(monkeypatch):
    """Tiles of 16 queries by 32 keys (the GPU's 64×128 in miniature), L = 37 leaving partial tiles both ways."""
    cfg = ops.LaunchConfig(16, 32, 8, 3, pipeline_all_loads=True)
    q, k, v, bias, mask = make_inputs(1, 2, 37, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    with ops.override(configs={"dbias": cfg}):
        got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_bias_gradient_with_one_or_several_row_splits(monkeypatch, splits):
    """One split writes dbias in bias's dtype directly; several are fp32 partial sums reduced in order."""
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float16, masked=True)
    dout = torch.randn_like(q)
    with ops.override(dbias_splits=splits):
        got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float16)


@pytest.mark.parametrize("unscaled", [False, True], ids=["prescaled_q", "unscaled"])
@pytest.mark.parametrize("scale", [0.0, -0.7, 2.0])
def test_bias_gradient_scores_at_zero_negative_and_large_scales(unscaled, scale):
    """The bias gradient's two ways to its scores (unscaled q·kᵀ with bias/scale as the accumulator, or q
    prescaled) give the reference: at scale 0 (which the first cannot divide by, so it is not used), a
    negative scale, and a scale above 1 in fp16 (q·scale could overflow, so q is not prescaled)."""
    q, k, v, bias, mask = make_inputs(1, 2, 5, 16, torch.float16, masked=True)
    dout = torch.randn_like(q)
    with ops.override(dbias_unscaled_scores=unscaled):
        got = forward_and_grads(attention, q, k, v, bias, dout, scale=scale, mask=mask)
    want = reference_fp64(q, k, v, bias, dout, scale=scale, mask=mask)
    assert_close_to_reference(got, want, torch.float16)


def test_bitwise_deterministic():
    q, k, v, bias, mask = make_inputs(1, 2, 9, 16, torch.float16, masked=True)
    dout = torch.randn_like(q)
    first = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    for _ in range(2):
        again = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_cdiv_is_the_ceiling_of_the_quotient():
    """ops.cdiv stands in for triton.cdiv on the host (grids, splits): the same values."""
    for a in range(200):
        for b in (1, 2, 3, 16, 32, 64, 128, 1024):
            assert ops.cdiv(a, b) == math.ceil(a / b) == triton.cdiv(a, b), (a, b)


def _output_and_gradients(q, k, v, bias, mask, dout) -> tuple[str, list[torch.Tensor]]:
    """attention()'s output's grad_fn name, and its output and gradients."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*ins, mask=mask)
    return out.grad_fn.name(), [out.detach(), *torch.autograd.grad(out, ins, dout)]


@pytest.mark.parametrize("masked", [False, True])
def test_plain_eager_calls_skip_the_custom_op_and_give_its_bits(masked):
    """Plain eager calls launch through ops.DirectAttention rather than the custom op (less host time per
    call); both run the same launchers, so outputs and gradients are bitwise equal."""
    q, k, v, bias, mask = make_inputs(1, 2, 9, 16, torch.float16, masked=masked)
    dout = torch.randn_like(q)
    direct_node, direct = _output_and_gradients(q, k, v, bias, mask, dout)
    with ops.override(direct_eager_calls=False):
        op_node, via_op = _output_and_gradients(q, k, v, bias, mask, dout)
    assert direct_node == "DirectAttentionBackward" and "flash_tt_attn_attention_fwd" in op_node
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), direct, via_op, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "custom-op"])
def test_second_derivatives_are_refused(direct):
    """create_graph=True gives first derivatives; differentiating them again raises rather than silently
    treating them as constants."""
    q, k, v, bias, _ = make_inputs(1, 1, 4, 16, torch.float32)
    ins = [t.requires_grad_() for t in (q, k, v, bias)]
    dout = torch.randn_like(q)
    with ops.override(direct_eager_calls=direct):
        dq = torch.autograd.grad(attention(*ins), ins, dout, create_graph=True)[0]
        assert torch.equal(dq.detach(), torch.autograd.grad(attention(*ins), ins, dout)[0])
        with pytest.raises(RuntimeError, match="no autograd formula"):
            dq.sum().backward()


def test_only_plain_eager_calls_skip_the_custom_op():
    """Fake tensors (opcheck, Inductor), dispatch modes (make_fx) and functorch transforms keep the custom op."""
    q, k, v, bias, mask = make_inputs(1, 1, 4, 16, torch.float32, masked=True)
    assert ops.direct_call_allowed(q, k, v, torch.nn.Parameter(bias), mask)
    with FakeTensorMode() as fake:
        fake_q = fake.from_tensor(q)
        assert not ops.direct_call_allowed(fake_q, k, v, bias, mask)
    with TorchDispatchMode():
        assert not ops.direct_call_allowed(q, k, v, bias, mask)
    seen = []
    torch.func.grad(lambda x: seen.append(ops.direct_call_allowed(x)) or x.sum())(q)
    assert seen == [False]
    with ops.override(direct_eager_calls=False):
        assert not ops.direct_call_allowed(q, k, v, bias, mask)
    assert ops.direct_call_allowed(q, k, v, bias, mask)  # the override ends with its block


def test_row_block_op_matches_rows_of_full_call():
    """ops.attention_fwd takes R <= L rows i (used by flash_tt_attn.distributed)."""
    q, k, v, bias, mask = make_inputs(1, 2, 8, 16, torch.float32, masked=True)
    full = attention_reference(q.double(), k.double(), v.double(), bias.double(), 0.25, mask)
    rows = slice(2, 5)
    out, lse = ops.attention_fwd(q[:, :, rows], k[:, :, rows], v[:, :, rows], bias, mask[:, rows], 0.25)
    assert lse.shape == (1, 2, 3, 8) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), full[:, :, rows], rtol=2e-5, atol=2e-6)


def test_pytorch_path_without_interpreter(monkeypatch):
    """Without CUDA and without TRITON_INTERPRET, attention() runs reference.attention_chunked."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine CPU tensors still take this path, but the env check is moot")
    q, k, v, bias, mask = make_inputs(2, 1, 6, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    got = forward_and_grads(attention, q, k, v, bias, dout, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float32)


def test_interpreter_requested_after_the_kernels_were_compiled_for_a_gpu(monkeypatch):
    """Triton fixes interpreted-or-compiled when the kernels are imported: setting TRITON_INTERPRET=1
    later must not send CPU tensors to compiled kernels (which fail); the reference path runs."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "KERNELS_INTERPRETED", False)
    q, k, v, bias, _ = make_inputs(1, 1, 4, 16, torch.float32)
    q.requires_grad_(True)
    out = attention(q, k, v, bias)
    assert type(out.grad_fn).__name__ == "_ChunkedAttentionBackward"


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_chunked_reference_matches_definition(chunk_rows):
    q, k, v, bias, mask = make_inputs(1, 2, 7, 16, torch.float64, masked=True)
    dout = torch.randn_like(q)
    got = forward_and_grads(attention_chunked, q, k, v, bias, dout, mask=mask, chunk_rows=chunk_rows)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, mask=mask), torch.float64)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before any kernel runs.

def _good():
    q = torch.randn(1, 2, 4, 4, 16)
    return dict(q=q, k=q.clone(), v=q.clone(), bias=torch.randn(1, 2, 4, 4))


BAD_INPUTS = [
    pytest.param(dict(q=torch.randn(2, 4, 4, 16)), ValueError, r"q must have shape \(B, H, L, L, D\)", id="q-rank"),
    pytest.param(dict(q=torch.randn(1, 2, 4, 5, 16)), ValueError, "equal pair dims", id="L1-ne-L2"),
    pytest.param(dict(k=torch.randn(1, 2, 4, 4, 32)), ValueError, "k must have q's shape", id="k-shape"),
    pytest.param(dict(v=torch.randn(1, 1, 4, 4, 16)), ValueError, "v must have q's shape", id="v-shape"),
    pytest.param(dict(bias=torch.randn(1, 2, 4, 5)), ValueError, r"bias must have shape \(B, H, L, L\)",
                 id="bias-shape"),
    pytest.param(dict(mask=torch.ones(1, 4, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(B, L, L\)",
                 id="mask-shape"),
    pytest.param(dict(mask=torch.ones(1, 4, 4)), TypeError, "mask must be a bool tensor", id="mask-dtype"),
    pytest.param(dict(bias=torch.randn(1, 2, 4, 4, dtype=torch.float64)), TypeError, "bias has dtype", id="mixed"),
    pytest.param(dict(q=torch.ones(1, 2, 4, 4, 16, dtype=torch.int32)), TypeError, "q has dtype torch.int32",
                 id="integer"),
    pytest.param(dict(q=torch.randn(1, 2, 4, 4, 24), k=torch.randn(1, 2, 4, 4, 24), v=torch.randn(1, 2, 4, 4, 24)),
                 ValueError, "head dim D = 24 is not supported", id="head-dim"),
    pytest.param(dict(q=[1.0]), TypeError, "q must be a torch.Tensor", id="not-a-tensor"),
    pytest.param(dict(scale="0.1"), TypeError, "scale must be a real number", id="scale-type"),
    pytest.param(dict(bias=torch.randn(1, 2, 4, 4, device="meta")), ValueError, "bias is on meta", id="devices"),
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_message(override, error, message):
    args = _good()
    args.update(override)
    with pytest.raises(error, match=message):
        attention(**args)


def test_offsets_inside_a_row_switch_to_int64_when_int32_would_overflow():
    """Strides are the caller's: a permuted or sliced view can make (L-1)·stride exceed 2³¹ - 1."""
    small = torch.empty_strided((1, 1, 8, 8, 16), (1024, 1024, 128, 16, 1), device="meta")
    huge = torch.empty_strided((1, 1, 8, 8, 16), (0, 0, 16, 2**29, 1), device="meta")
    assert ops.row_offset_dtype(8, 16, small.stride(), small.stride()) == tl.int32
    assert ops.row_offset_dtype(8, 16, small.stride(), huge.stride()) == tl.int64


def test_int64_row_offsets_give_the_same_gradients():
    q, k, v, bias, mask = make_inputs(1, 2, 5, 16, torch.float32, masked=True)
    dout = torch.randn_like(q)
    with ops.override(row_offset_dtype=tl.int64):
        got = forward_and_grads(attention, q, k, v, bias, dout, scale=0.5, mask=mask)
    assert_close_to_reference(got, reference_fp64(q, k, v, bias, dout, scale=0.5, mask=mask), torch.float32)
