"""GPU probe 45: CUDA graphs against the host's launch work at small L (PERF.md next step 8; probes 41-44).

For each shape, forward (under no_grad) and forward+backward (``torch.autograd.grad``), four variants timed with
``triton.testing.do_bench`` (medians, p20, p80 in ms; the L2 flushed between calls, as the pipeline times):
ours eager, ours replayed from a CUDA graph, flex compiled (as the pipeline's provider builds it), and flex's
compiled call replayed from a CUDA graph. Graphs are captured after a warm-up on a side stream. The replayed
outputs are compared with the eager ones bitwise (ours) or to 1e-2 (flex, whose bias gradient uses atomics).

Usage: python experiments/scripts/probe45.py OUT_DIR
"""

import functools
import sys

import torch
import torch._dynamo
import triton
import tune_kernels as tk

from flash_tt_attn import attention

SHAPES = [
    (4, 8, 64, 32, torch.float16), (4, 8, 128, 32, torch.float16), (4, 8, 256, 32, torch.float16),
    (1, 4, 128, 32, torch.bfloat16), (1, 4, 256, 32, torch.bfloat16), (1, 4, 512, 32, torch.bfloat16),
]


def in_graph(step):
    """step captured in a CUDA graph after a warm-up: (replay, the captured outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph.replay, outputs


def steps(call, leaves, dout, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return [call()]
    else:
        def step():
            out = call()
            return [out.detach(), *torch.autograd.grad(out, leaves, dout)]
    return step


def time_ms(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=500, quantiles=[0.5, 0.2, 0.8])


def measure_shape(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    ours_leaves = tk.make(B, H, L, D, dtype)
    flex_call, flex_leaves = tk.flex_setup(*ours_leaves)
    dout = torch.randn_like(ours_leaves[0])
    flex_dout = dout.permute(0, 2, 1, 3, 4).reshape(B * L, H, L, D).contiguous()
    for mode in ("fwd", "fwd_bwd"):
        providers = {
            "ours": steps(functools.partial(attention, *ours_leaves), ours_leaves, dout, mode),
            "flex": steps(flex_call, flex_leaves, flex_dout, mode),
        }
        for name, step in providers.items():
            eager = step()
            try:
                replay, captured = in_graph(step)
                replay()
                torch.cuda.synchronize()
                if name == "ours":
                    agree = all(torch.equal(a, b) for a, b in zip(captured, eager, strict=True))
                else:
                    agree = all(torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)
                                for a, b in zip(captured, eager, strict=True))
                graph_ms = time_ms(replay)
                error = None
            except Exception as exc:  # a capture that fails is a result too
                agree, graph_ms, error = None, None, f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
            eager_ms = time_ms(step)
            tk.log(kind="time", provider=name, mode=mode, eager_ms=eager_ms, graph_ms=graph_ms,
                   graph_agrees=agree, error=error, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    # Every (L, dtype, grad mode) recompiles flex: keep them all, as the pipeline's provider does (its first
    # run here, at b4e4231, hit the default limit after four shapes and timed flex uncompiled from there on).
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 512))
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in SHAPES:
        measure_shape(B, H, L, D, dtype)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
