"""GPU probe 48: the bias gradient on a second CUDA stream, concurrent with dk/dv.

After dq (which writes delta) the bias-gradient and dk/dv kernels are independent. At D = 128 the bias gradient
is bound by L2 bandwidth (12 bytes per score, PERF.md v15-v16) and dk/dv by issue; run side by side, each SM
takes whichever program the scheduler gives it, and the bias gradient's programs may run faster on fewer SMs
(less L2 contention) while dk/dv uses the rest. Prediction: at D = 128 (B1 H4 L512 bf16) the backward −0.2 to
−0.4 ms of 3.6 if that holds, no change if the L2 rate falls with the SMs; at D = 32 (both kernels issue-bound)
no gain. The library's backward op against the same launchers with the bias gradient on a side stream, two
alternated rounds of `do_bench` (medians, p20, p80) on the backward alone (out and lse from one forward), and the
gradients compared bitwise.

Usage: python experiments/scripts/probe48.py OUT_DIR
"""

import sys

import torch
import triton
import tune_kernels as tk
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import ops

SHAPES = [
    (1, 4, 512, 128, torch.bfloat16), (1, 4, 1024, 128, torch.bfloat16), (4, 8, 512, 64, torch.float16),
    (4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16),
    (1, 4, 1024, 32, torch.bfloat16),
]
SIDE = None


def backward_two_streams(dout, q, k, v, bias, mask, out, lse, scale):
    """ops.attention_bwd's launches, the bias gradient on SIDE while dk/dv runs on the current stream."""
    main = torch.cuda.current_stream()
    with set_wrap_triton_enabled(False):
        delta = torch.empty_like(lse)
        mask_args = ops._mask_args(mask, q)
        common = ops.backward_constants(q, mask_args, scale)
        args = (dout, q, k, v, bias, mask_args)
        dq = ops._launch_dq(*args, out, lse, delta, scale, common)
        plan = ops._dbias_plan(q)
        SIDE.wait_stream(main)
        with torch.cuda.stream(SIDE):
            dbias = ops._launch_dbias(*args, lse, delta, scale, common, plan)
        dk, dv = ops._launch_dkdv(*args, lse, delta, scale, common)
        main.wait_stream(SIDE)
        dbias.record_stream(main)
    return dq, dk, dv, dbias


def measure_shape(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D ** -0.5
    out, lse = ops.attention_fwd(q, k, v, bias, None, scale)
    dout = torch.randn_like(q)
    variants = {
        "library": lambda: ops.attention_bwd(dout, q, k, v, bias, None, out, lse, scale),
        "two_streams": lambda: backward_two_streams(dout, q, k, v, bias, None, out, lse, scale),
    }
    results = {name: call() for name, call in variants.items()}
    torch.cuda.synchronize()
    equal = all(torch.equal(a, b) for a, b in zip(results["library"], results["two_streams"], strict=True))
    tk.log(kind="bits", equal=equal, **shape)
    del results
    for round_ in range(2):
        for name, call in variants.items():
            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(call, warmup=25, rep=500, quantiles=[0.5, 0.2, 0.8])
            tk.log(kind="time", variant=name, round=round_, ms=ms, peak_mb=peak_mb, **shape)


def main():
    global SIDE
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    SIDE = torch.cuda.Stream()
    for shape in SHAPES:
        measure_shape(*shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
