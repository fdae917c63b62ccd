"""GPU probe 16, three questions in one process:

A. Do tensor-descriptor (TMA) loads make dq faster? The library's dq kernel against dq_tma.py's (k and v
   through descriptors, the bias tile through one too or through pointers): outputs compared, each timed
   twice in alternation.
B. Which dk/dv config is faster where: the shipped one (settled accumulators, 168 registers) or the
   serialized one at 128 registers (probe 12 found it faster at the two smallest targets): the torch
   profiler's time per kernel and forward+backward medians, twice each, at six shapes.
C. Does the forward's time per score grow between L = 768 and 1024 at B=4 H=8 (seed-fwd's 0.89× row)?
   Forward medians at L = 512, 768, 1024 (and B=2 at 1024), with 2 rows per program and with 1.

Usage: python experiments/scripts/probe16.py OUT_DIR
"""

import functools
import sys

import torch
import triton
import tune_kernels as tk
from dq_tma import dq_library, dq_tma

SERIAL_128 = (64, 64, 4, 3, 1, True, True, 128, False)  # LaunchConfig: serialized wgmmas, 128 registers


def time_ms(fn):
    ms, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80


def part_a():
    for B, H, L, D, dtype in [(4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16)]:
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        dout = torch.randn_like(q)
        scale = D**-0.5
        out, lse = tk.forward_op(q, k, v, bias, scale)
        args = (q, k, v, bias, out, lse, dout, scale)
        variants = {"library": functools.partial(dq_library, *args),
                    "tma_kvb": functools.partial(dq_tma, *args, bias_through_tma=True),
                    "tma_kv": functools.partial(dq_tma, *args, bias_through_tma=False)}
        want_dq, want_delta = variants["library"]()
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        for name, fn in variants.items():
            dq, delta = fn()
            tk.log(kind="check", part="A", variant=name, dq_vs_library=tk.rel(dq, want_dq),
                   delta_vs_library=tk.rel(delta, want_delta), **shape)
        for repeat in range(2):
            for name, fn in variants.items():
                ms, p20, p80 = time_ms(fn)
                tk.log(kind="time", part="A", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)


def part_b_shape(B, H, L, D, dtype):
    variants = {"shipped": {}, "serial128": {"dkdv_config": SERIAL_128}}
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    dout = torch.randn_like(q)

    def call():
        return tk.attention(q, k, v, bias)

    def grads():
        return torch.autograd.grad(call(), inputs, dout)
    want = grads()
    got = tk.with_configs(variants["serial128"], grads)
    tk.log(kind="check", part="B", variant="serial128", max_rel_vs_shipped=max(map(tk.rel, got, want)),
           bitwise_equal=all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), **shape)
    for repeat in range(2):
        for name, configs in variants.items():
            ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, "fwd_bwd")
            tk.log(kind="time", part="B", mode="fwd_bwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80,
                   peak_mb=peak, **shape)
        for name, configs in variants.items():
            tk.log_kernel_profile(name, configs, call, inputs, dout, warmup=3, runs=10, part="B", rep=repeat,
                                  **shape)


def part_b():
    for shape in [(4, 8, 256, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16), (1, 4, 512, 32, torch.float16),
                  (4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16), (4, 8, 384, 32, torch.float16)]:
        part_b_shape(*shape)
        torch.cuda.empty_cache()


def part_c():
    variants = {"shipped": {}, "rows1": {"forward_config": (64, 64, 4, 3, 1, True)}}
    for B, H, L, D, dtype in [(4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
                              (4, 8, 1024, 32, torch.float16), (2, 8, 1024, 32, torch.float16)]:
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        scale = D**-0.5
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        for repeat in range(2):
            for name, configs in variants.items():
                ms, p20, p80, _ = tk.with_configs(configs, tk.bench,
                                                  functools.partial(tk.forward_op, q, k, v, bias, scale))
                tk.log(kind="time", part="C", mode="fwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80,
                       ns_per_score=ms * 1e6 / (B * H * L**3), **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for part in (part_a, part_b, part_c):
        try:
            part()
        except Exception as error:  # noqa: BLE001 - one part's failure must not lose the others' rows
            tk.log(kind="error", part=part.__name__, error=repr(error)[:500])


if __name__ == "__main__":
    main()
