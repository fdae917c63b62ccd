"""Measure one point: latency quantiles, peak memory, or relative error against an fp64 reference.

Inputs are created (seeded) and converted to the provider's native layout before anything is timed;
only the provider's call, plus ``backward`` with a fixed random dO for ``fwd_bwd``, is timed. A
warm-up call runs first so that compilation and autotuning stay outside the measurements.

Latency on CUDA: ``triton.testing.do_bench`` (median, p20, p80 in ms; gradients reset outside the
timed region). On CPU: the same quantiles from ``time.perf_counter`` (for tests; not for the paper).

Peak memory on CUDA (MB = 2**20 bytes, as in the anchors): ``max_memory_allocated`` during one call
minus ``memory_allocated`` just before it, inputs (and dO) already allocated, gradients cleared, so
the output, the saved activations and the gradients count. ``None`` on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .providers import from_layout, get_provider, to_layout
from .spec import Point

QUANTILES = (0.5, 0.2, 0.8)
MB = 2**20


def _make_attention(point: Point, provider, device):
    dtype = getattr(torch, point.dtype)
    shape = (point.B, point.H, point.L, point.L, point.D)
    needs_grad = point.mode == "fwd_bwd"
    torch.manual_seed(0)
    leaves = []
    for _ in range(3):
        t = torch.randn(shape, device=device, dtype=dtype)
        leaves.append(to_layout(t, provider.layout).contiguous().requires_grad_(needs_grad))
        del t
    bias = torch.randn(shape[:4], device=device, dtype=dtype).requires_grad_(needs_grad)
    leaves.append(bias)
    fn = provider.bind(*leaves)
    d_out = torch.randn_like(leaves[0]) if needs_grad else None
    return fn, leaves, d_out


def _make_block(point: Point, provider, device):
    dtype = getattr(torch, point.dtype)
    needs_grad = point.mode == "fwd_bwd"
    torch.manual_seed(0)
    module = provider.build(point.c_in, point.D, point.H).to(device=device, dtype=dtype)
    x = torch.randn(point.B, point.L, point.L, point.c_in, device=device, dtype=dtype).requires_grad_(needs_grad)
    leaves = [x, *module.parameters()]
    d_out = torch.randn_like(x) if needs_grad else None
    return (lambda: module(x)), leaves, d_out


def make_call(point: Point, provider, device) -> tuple[Callable, list]:
    """Prepare inputs for ``point`` and return (call, leaves): ``call`` runs one forward (under
    ``no_grad``) or one forward+backward; ``leaves`` are the tensors whose ``.grad`` it fills."""
    make = _make_attention if point.op == "attention" else _make_block
    fn, leaves, d_out = make(point, provider, device)
    if point.mode == "fwd":
        def call():
            with torch.no_grad():
                return fn()
    else:
        def call():
            fn().backward(d_out)
    return call, leaves


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(leaves):
    for t in leaves:
        t.grad = None


def time_call(call: Callable, leaves: list, device, warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    """Median, p20 and p80 of the call's time in ms."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        ms = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                                     quantiles=list(QUANTILES))
        return tuple(float(x) for x in ms)

    def once():
        _clear_grads(leaves)
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3

    spent = 0.0
    while spent < warmup_ms:
        spent += once()
    times = []
    while len(times) < 5 or (sum(times) < rep_ms and len(times) < 1000):
        times.append(once())
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in q)


def peak_memory_mb(call: Callable, leaves: list, device) -> float | None:
    """Peak memory of one call above what was allocated before it, in MB (2**20 bytes); None off CUDA."""
    if device.type != "cuda":
        return None
    _clear_grads(leaves)
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    _clear_grads(leaves)
    return (peak - before) / MB


def measure(point: Point, metrics, device, warmup_ms: float, rep_ms: float) -> dict:
    """Measure ``point`` (provider already loadable) and return the row's measured fields."""
    provider = get_provider(point.op, point.provider)
    provider.load(device)
    if "error" in metrics:
        return relative_errors(point, provider, device)
    call, leaves = make_call(point, provider, device)
    call()  # warm-up: compilation and autotuning stay outside the measurements
    _sync(device)
    out = {}
    if "memory" in metrics:
        out["peak_mem_mb"] = peak_memory_mb(call, leaves, device)
    if "latency" in metrics:
        out["ms"], out["ms_p20"], out["ms_p80"] = time_call(call, leaves, device, warmup_ms, rep_ms)
    return out


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach()
    return float((x - ref).norm() / ref.norm())


def relative_errors(point: Point, provider, device) -> dict:
    """Relative errors ‖x − ref‖/‖ref‖ of o (and dq, dk, dv, dbias for ``fwd_bwd``) against
    :func:`flash_tt_attn.reference.attention_reference` in float64, same random inputs and dO."""
    from flash_tt_attn.reference import attention_reference  # noqa: PLC0415

    dtype = getattr(torch, point.dtype)
    needs_grad = point.mode == "fwd_bwd"
    torch.manual_seed(0)
    shape = (point.B, point.H, point.L, point.L, point.D)
    ref_in = [torch.randn(shape, device=device, dtype=torch.float64) for _ in range(3)]
    ref_in.append(torch.randn(shape[:4], device=device, dtype=torch.float64))
    d_out = torch.randn(shape, device=device, dtype=torch.float64)
    ref_in = [t.requires_grad_(needs_grad) for t in ref_in]
    ref_o = attention_reference(*ref_in)

    lay = provider.layout
    ins = [to_layout(t.detach().to(dtype), lay).contiguous().requires_grad_(needs_grad) for t in ref_in[:3]]
    ins.append(ref_in[3].detach().to(dtype).requires_grad_(needs_grad))
    fn = provider.bind(*ins)
    with torch.set_grad_enabled(needs_grad):
        o = fn()
    errs = {"err_o": _rel(from_layout(o, lay), ref_o.detach())}
    if needs_grad:
        ref_o.backward(d_out)
        o.backward(to_layout(d_out.to(dtype), lay))
        for name, t, r in zip(("dq", "dk", "dv"), ins[:3], ref_in[:3], strict=True):
            errs[f"err_{name}"] = _rel(from_layout(t.grad, lay), r.grad)
        errs["err_dbias"] = _rel(ins[3].grad, ref_in[3].grad)
    return errs
