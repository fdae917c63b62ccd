"""The block's Triton layer norm (kernels/layer_norm.py, api.layer_norm_rows) against an fp64 reference.

On CPU the kernel runs under Triton's interpreter (fp32, fp16); the GPU test checks bf16 at a block's width.
"""

import pytest
import torch
import torch.nn.functional as F

from flash_tt_attn import api, ops

HAS_CUDA = torch.cuda.is_available()


def norm_of(c, dtype=torch.float32, device="cpu"):
    norm = torch.nn.LayerNorm(c)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.5)
    return norm.to(device=device, dtype=dtype)


def reference(x, norm):
    return F.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def views(x):
    """The layouts the block hands its layer norm: whole, the ending node's transposed view, a chunk of rows of a
    batch of two (neither viewable as one matrix of rows)."""
    return {"whole": x, "transposed": x.transpose(1, 2), "chunk": x[:, 1:4]}


def kernel_calls(monkeypatch):
    calls = []
    real = ops.launch_layer_norm

    def spy(x, *args):
        calls.append(tuple(x.stride()))
        return real(x, *args)

    monkeypatch.setattr(ops, "launch_layer_norm", spy)
    return calls


@pytest.mark.parametrize("c", [16, 24], ids=["c16", "c24-masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_norm_rows_matches_fp64_on_every_layout(dtype, c, monkeypatch):
    calls = kernel_calls(monkeypatch)
    norm = norm_of(c, dtype)
    x = (torch.randn(2, 5, 5, c) * 3 + 1).to(dtype)
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    for name, view in views(x).items():
        with torch.no_grad():
            y = api.layer_norm_rows(view, norm)
        assert y.shape == view.shape and y.dtype == dtype and y.is_contiguous(), name
        torch.testing.assert_close(y.double(), reference(view, norm), rtol=tol, atol=tol, msg=name)
    assert calls == [tuple(v.stride()) for v in views(x).values()]  # the kernel ran, on the views in place


def test_layer_norm_rows_gradients_are_pytorchs_backward():
    """The backward is aten.native_layer_norm_backward on the kernel's mean and 1/std: x's, the weight's and the
    bias's gradients equal F.layer_norm's to rounding, and close to fp64."""
    norm = norm_of(24)
    x = torch.randn(2, 5, 5, 24).transpose(1, 2)
    dy = torch.randn(2, 5, 5, 24)
    results = []
    for run in (lambda t: api.layer_norm_rows(t, norm), lambda t: F.layer_norm(t, (24,), norm.weight, norm.bias),
                lambda t: reference(t, norm)):
        norm.zero_grad(set_to_none=True)
        t = x.detach().clone().requires_grad_(True)
        run(t).backward(dy.to(run(t).dtype))
        results.append([t.grad.double(), norm.weight.grad.double(), norm.bias.grad.double()])
    ours, torchs, fp64 = results
    for name, a, b, c in zip(("x", "weight", "bias"), ours, torchs, fp64, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["autocast", "bf16-on-cpu", "fp64", "strided-channels", "3-d", "no-affine"])
def test_layer_norm_rows_leaves_what_it_does_not_cover_to_the_module(case, monkeypatch):
    calls = kernel_calls(monkeypatch)
    norm, x = norm_of(16), torch.randn(1, 4, 4, 16)
    if case == "bf16-on-cpu":
        norm, x = norm.bfloat16(), x.bfloat16()
    elif case == "fp64":  # the kernel's statistics are fp32: float64 calls (gradient checks) keep full precision
        norm, x = norm.double(), x.double()
    elif case == "strided-channels":
        x = torch.randn(1, 4, 16, 4).transpose(2, 3)
    elif case == "3-d":
        x = x[0]
    elif case == "no-affine":
        norm = torch.nn.LayerNorm(16, elementwise_affine=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got, want = api.layer_norm_rows(x, norm), norm(x)
    assert calls == []
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_layer_norm_rows_at_a_blocks_width(dtype):
    """c = 128, L = 200, B = 2: every layout close to fp64 (within one rounding of the output dtype, as
    PyTorch's own), and the gradients close to PyTorch's."""
    norm = norm_of(128, dtype, "cuda")
    x = (torch.randn(2, 200, 200, 128, device="cuda") * 2 + 0.5).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, view in views(x).items():
        with torch.no_grad():
            y = api.layer_norm_rows(view, norm)
            theirs = norm(view)
        want = reference(view, norm)
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=name)
        assert (y.double() - want).abs().max() <= 1.01 * (theirs.double() - want).abs().max() + 1e-6, name
    t = x.transpose(1, 2).detach().requires_grad_(True)
    dy = torch.randn_like(x)
    api.layer_norm_rows(t, norm).backward(dy)
    ours = [t.grad.float(), norm.weight.grad.float()]
    t.grad, norm.weight.grad = None, None
    norm(t).backward(dy)
    for a, b in zip(ours, [t.grad.float(), norm.weight.grad.float()], strict=True):
        torch.testing.assert_close(a, b, rtol=5 * tol, atol=5 * tol)


def test_eager_layer_norm_launches_outside_wrap_triton(monkeypatch):
    """Eager launches go through the launch cache: torch leaves wrap_triton on outside its custom ops, and a
    launch through it took ~0.35 ms of host time on an H100 (PERF.md v32), with and without gradients."""
    from torch._library.triton import is_wrap_triton_enabled

    seen = []
    real = ops.launch_layer_norm
    monkeypatch.setattr(ops, "launch_layer_norm", lambda *a: seen.append(is_wrap_triton_enabled()) or real(*a))
    norm, x = norm_of(16), torch.randn(1, 4, 4, 16)
    with torch.no_grad():
        api.layer_norm_rows(x, norm)
    api.layer_norm_rows(x.requires_grad_(True), norm).sum().backward()
    assert is_wrap_triton_enabled() and seen == [False, False]
