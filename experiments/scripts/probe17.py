"""GPU probe 17: the forward and dk/dv kernels with their loop loads through tensor descriptors (TMA), after
probe 16 timed dq 2–5% faster that way, and a second timing of that dq variant. The library's kernels are
launched by dq_tma.dq_library and dkdv_tma.dkdv_library, which at the time of this probe left wrap_triton on:
its dk/dv baseline ran without the register cap (probe 18). Each variant is checked
against the library's kernel on the same inputs, then timed twice in alternation with it, in one process.

Usage: python experiments/scripts/probe17.py OUT_DIR
"""

import functools
import sys

import torch
import triton
import tune_kernels as tk
from dkdv_tma import dkdv_library, dkdv_tma
from dq_tma import dq_library, dq_tma
from forward_tma import forward_tma

TARGETS = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
           (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16)]


def time_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])


def compare_and_time(kernel, variants, shape):
    """variants: name -> callable returning a tuple of tensors; the first is the reference."""
    names = list(variants)
    want = variants[names[0]]()
    for name in names[1:]:
        got = variants[name]()
        tk.log(kind="check", kernel=kernel, variant=name, max_rel_vs_library=max(map(tk.rel, got, want)),
               bitwise_equal=all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), **shape)
    for repeat in range(2):
        for name in names:
            ms, p20, p80 = time_ms(variants[name])
            tk.log(kind="time", kernel=kernel, variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)


def probe_shape(B, H, L, D, dtype, backward):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D**-0.5
    compare_and_time("forward", {"library": functools.partial(tk.forward_op, q, k, v, bias, scale),
                                 "tma_s3": functools.partial(forward_tma, q, k, v, bias, scale, stages=3),
                                 "tma_s2": functools.partial(forward_tma, q, k, v, bias, scale, stages=2)}, shape)
    if not backward:
        return
    dout = torch.randn_like(q)
    out, lse = tk.forward_op(q, k, v, bias, scale)
    args = (q, k, v, bias, out, lse, dout, scale)
    compare_and_time("dq", {"library": functools.partial(dq_library, *args),
                            "tma_kvb": functools.partial(dq_tma, *args, bias_through_tma=True)}, shape)
    _, delta = dq_library(*args)
    args = (q, k, v, bias, lse, delta, dout, scale)
    compare_and_time("dkdv", {"library": functools.partial(dkdv_library, *args),
                              "tma_r168": functools.partial(dkdv_tma, *args),
                              "tma_uncapped": functools.partial(dkdv_tma, *args, max_registers=None)}, shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in TARGETS:
        try:
            probe_shape(B, H, L, D, dtype, backward=L <= 1024)
        except Exception as error:  # noqa: BLE001 - one shape's failure must not lose the others' rows
            tk.log(kind="error", B=B, H=H, L=L, error=repr(error)[:500])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
