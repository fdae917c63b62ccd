"""GPU tests of the eager host path: the launch cache (flash_tt_attn/launch.py) and DirectAttention give the
bits of Triton's own launches and of the custom op, on the layouts where Triton specializes differently
(16-byte misaligned views, L not a multiple of 16 or of the tiles, masks, head dims, dtypes)."""

import pytest
import torch

from flash_tt_attn import attention, ops

pytestmark = pytest.mark.gpu


def _outputs_and_gradients(B, H, L, D, dtype, masked, misaligned, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    offset = 1 if misaligned else 0  # one element past the allocation's start: not 16-byte aligned
    flat = [torch.randn(B * H * L * L * D + offset, device="cuda", generator=g).to(dtype) for _ in range(3)]
    q, k, v = (t[offset:].view(B, H, L, L, D).requires_grad_() for t in flat)
    bias = torch.randn(B, H, L, L, device="cuda", generator=g).to(dtype).requires_grad_()
    mask = torch.rand(B, L, L, device="cuda", generator=g) > 0.2 if masked else None
    out = attention(q, k, v, bias, None, mask)
    out.backward(torch.randn(out.shape, device="cuda", generator=g).to(dtype))
    return [t.detach().clone() for t in (out, q.grad, k.grad, v.grad, bias.grad)]


def _set_launch_cache(enabled: bool):
    for launcher in ops._LAUNCHERS.values():
        launcher.enabled = enabled
        launcher._cache.clear()


CASES = [
    (1, 4, 128, 32, torch.bfloat16, False, False),
    (1, 2, 100, 32, torch.bfloat16, True, True),
    (1, 2, 77, 64, torch.float16, False, True),
    (1, 1, 96, 128, torch.bfloat16, True, False),
    (1, 2, 33, 16, torch.float32, True, True),
    (2, 2, 256, 32, torch.float16, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-L{c[2]}-D{c[3]}-{c[4]}-mask{c[5]}-mis{c[6]}")
def test_launch_cache_gives_tritons_bits(case):
    assert all(launcher.enabled for launcher in ops._LAUNCHERS.values()), "Triton 3.6 on CUDA takes the cache"
    try:
        _set_launch_cache(False)
        want = _outputs_and_gradients(*case)
        _set_launch_cache(True)
        first = _outputs_and_gradients(*case)  # misses: fills the cache through Triton
        hits = sum(launcher.hits for launcher in ops._LAUNCHERS.values())
        again = _outputs_and_gradients(*case)
        assert sum(launcher.hits for launcher in ops._LAUNCHERS.values()) > hits, "the second call must hit"
    finally:
        _set_launch_cache(True)
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "dbias"), want, first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name


@pytest.mark.parametrize("case", CASES[:3], ids=["L128", "L100-mask-mis", "L77-D64-mis"])
def test_direct_eager_calls_give_the_custom_ops_bits(case):
    direct = _outputs_and_gradients(*case)
    with ops.override(direct_eager_calls=False):
        via_op = _outputs_and_gradients(*case)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), direct, via_op, strict=True):
        assert torch.equal(a, b), name


def test_no_grad_forward_gives_the_forward_of_a_grad_call():
    q, k, v = (torch.randn(1, 2, 64, 64, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        plain = attention(q, k, v, bias)
    tracked = attention(q.requires_grad_(), k, v, bias)
    assert plain.grad_fn is None and tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
