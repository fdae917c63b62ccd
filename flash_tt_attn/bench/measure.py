"""Measure one point: latency quantiles, peak memory, or relative error against an fp64 reference.

Inputs are created (seeded) and converted to the provider's native layout before anything is timed;
only the provider's call, plus ``backward`` with a fixed random dO for ``fwd_bwd``, is timed. A
warm-up call runs first so that compilation and autotuning stay outside the measurements.

Latency on CUDA: ``triton.testing.do_bench`` (median, p20, p80 in ms; gradients reset outside the
timed region). A call that takes at least :data:`SLOW_CALL_MS` (the long-inference baselines at large L take
3-30 s) is instead timed :data:`SLOW_CALL_REPEATS` times, each between CUDA events after a synchronisation:
do_bench would spend eight calls on it (one, five to estimate, a warm-up) and time a single one. On CPU: the
same quantiles from ``time.perf_counter`` (for tests; not for the paper).

Peak memory on CUDA (MB = 2**20 bytes, as in the anchors): ``max_memory_allocated`` during one call
minus ``memory_allocated`` just before it, inputs (and dO) already allocated, gradients cleared, so
the output, the saved activations and the gradients count. ``None`` on CPU.

Host time (:func:`host_time`, the ``host`` metric): what a caller's thread spends in each call when
calls follow each other with no synchronisation between them, as in a training loop. After a few
unsynchronised warm-up calls and one synchronisation, each of up to :data:`HOST_CALLS` back-to-back
calls is timed with ``perf_counter`` (gradients set to None between them, outside the timed region);
median, p20 and p80 over the calls, in ms. One synchronisation follows the loop; ``host_wall_ms`` is the
loop's wall time including it, per call. While the host runs ahead of the GPU, ``host_ms`` is the
launch overhead alone; once the GPU's queue fills, calls wait for it, so a GPU-bound call's p80 (and
``host_wall_ms``) approaches its GPU time. The same on CPU, where it is the call's whole time.

CUDA graph (:func:`graph_time`, the ``graph`` metric): the call runs three times on a side stream
(warm-up, as ``torch.cuda.graph`` requires), the gradients are set to None, and one call (forward, or
forward and backward together) is captured on that stream into a ``torch.cuda.CUDAGraph``. Before
timing, the graph's outputs (the forward's output, or every gradient the backward writes) are filled
with NaN, the graph is replayed once, and the outputs must then match the eager call's to 1% (relative
norm): proof that a replay does the call's work. Replays are timed by ``do_bench`` as ``latency``.
A capture or check that fails gives ``graph_error`` (the row keeps its other metrics); off CUDA the
graph fields are ``None`` and ``graph_error`` too (nothing was tried).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .providers import from_layout, get_provider, to_layout
from .spec import Point

QUANTILES = (0.5, 0.2, 0.8)
#: Calls at least this slow (ms, measured on one timed call after the warm-up) are timed SLOW_CALL_REPEATS times.
SLOW_CALL_MS = 1000.0
SLOW_CALL_REPEATS = 3
MB = 2**20
#: Back-to-back calls the host metric times at most (it stops earlier, after at least HOST_MIN_CALLS,
#: once rep_ms of wall time has passed), and the unsynchronised warm-up calls before them.
HOST_CALLS = 50
HOST_MIN_CALLS = 10
HOST_WARMUP_CALLS = 3
#: Eager calls on the capture stream before a graph is captured.
GRAPH_WARMUP_CALLS = 3
#: Largest relative norm ||replayed - eager|| / ||eager|| a replay's outputs may have.
GRAPH_CHECK_RTOL = 1e-2


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
    starting = point.node != "ending"  # None (rows and points from before the node axis) is the starting node
    module = provider.build(point.c_in, point.D, point.H, starting=starting).to(device=device, dtype=dtype)
    x = torch.randn(point.B, point.L, point.L, point.c_in, device=device, dtype=dtype).requires_grad_(needs_grad)
    leaves = [x, *module.parameters()]
    d_out = torch.randn_like(x) if needs_grad else None
    return provider.bind(module, x), leaves, d_out


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


def _quantiles(times) -> tuple[float, float, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in q)


def time_call(call: Callable, leaves: list, device, warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    """Median, p20 and p80 of the call's time in ms."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        def timed():
            _clear_grads(leaves)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)

        first = timed()
        if first >= SLOW_CALL_MS:
            return _quantiles([first] + [timed() for _ in range(SLOW_CALL_REPEATS - 1)])
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
    return _quantiles(times)


def host_time(call: Callable, leaves: list, device, rep_ms: float) -> dict:
    """The ``host`` metric (module docstring): per-call host time over back-to-back calls, in ms."""
    for _ in range(HOST_WARMUP_CALLS):
        _clear_grads(leaves)
        call()
    _clear_grads(leaves)
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < HOST_CALLS and (len(times) < HOST_MIN_CALLS or (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        _clear_grads(leaves)  # outside the timed call, as do_bench's grad_to_none
    _sync(device)
    wall = (time.perf_counter() - start) * 1e3
    med, p20, p80 = _quantiles(times)
    return {"host_ms": med, "host_ms_p20": p20, "host_ms_p80": p80, "host_wall_ms": wall / len(times),
            "host_calls": len(times)}


def _rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def check_replay(replay: Callable, outs: list, refs: list, sync: Callable = lambda: None) -> str | None:
    """Fill ``outs`` (the tensors a replay writes) with NaN, ``replay()`` once, and compare them with the
    eager call's ``refs``; return None when they match to :data:`GRAPH_CHECK_RTOL`, else what is wrong."""
    if not outs:
        return "replay check: the captured call writes no output to check"
    for t in outs:
        t.detach().fill_(float("nan"))
    replay()
    sync()
    for i, (t, ref) in enumerate(zip(outs, refs, strict=True)):
        if not bool(torch.isfinite(t).all()):
            return f"replay check: output {i} not (fully) written by the replay"
        rel = _rel_diff(t, ref)
        if not rel <= GRAPH_CHECK_RTOL:
            return f"replay check: output {i} differs from the eager call's (relative norm {rel:.3g})"
    return None


def _written(out, leaves) -> list:
    """What one call writes: its output (forward; the call returns it), or the gradients (forward+backward)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t.grad for t in leaves if t.grad is not None]


def graph_time(call: Callable, leaves: list, device, warmup_ms: float, rep_ms: float) -> dict:
    """The ``graph`` metric (module docstring): capture one call in a CUDA graph, check a replay, time replays."""
    out = dict.fromkeys(("graph_ms", "graph_ms_p20", "graph_ms_p80", "graph_error"))
    if device.type != "cuda":
        return out
    import triton.testing  # noqa: PLC0415

    graph = static = None
    caller = torch.cuda.current_stream(device)
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP_CALLS):
                _clear_grads(leaves)
                eager = call()
        caller.wait_stream(stream)
        _sync(device)
        refs = [t.detach().clone() for t in _written(eager, leaves)]
        del eager
        _clear_grads(leaves)  # the captured backward then allocates the gradients: replays overwrite them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static = call()
        problem = check_replay(graph.replay, _written(static, leaves), refs, lambda: _sync(device))
        if problem is not None:
            out["graph_error"] = problem
        else:
            ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
            out["graph_ms"], out["graph_ms_p20"], out["graph_ms_p80"] = (float(x) for x in ms)
    except Exception as e:  # noqa: BLE001 (a provider that cannot be captured keeps its other metrics)
        text = f"{type(e).__name__}: {e}".strip()
        out.update(dict.fromkeys(("graph_ms", "graph_ms_p20", "graph_ms_p80")),
                   graph_error=text if len(text) <= 2000 else text[:2000] + " [...]")
    finally:
        torch.cuda.set_stream(caller)  # torch.cuda.graph leaves its stream current when capture_end raises
        del graph, static
        _clear_grads(leaves)
    try:
        _sync(device)
    except Exception as e:  # noqa: BLE001 (the device may be unusable now; the metrics taken before stand)
        out["graph_error"] = f"{out['graph_error'] or 'after the capture'}; then {type(e).__name__}: {e}"[:2000]
    return out


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
    provider = get_provider(point.op, point.provider, point.options)
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
    if "host" in metrics:
        out.update(host_time(call, leaves, device, rep_ms))
    if "graph" in metrics:  # last: a failed capture must not disturb the other metrics
        out.update(graph_time(call, leaves, device, warmup_ms, rep_ms))
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
