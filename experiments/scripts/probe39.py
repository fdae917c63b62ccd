"""GPU probe 39: where the host's time goes in one eager forward+backward call at B=1 H=4 L=512 D=32 bf16, the
target that probe 38 found at the boundary between host-bound and device-bound. cProfile over 50 steps enqueued
back to back (no profiler of torch's own), the 40 functions with the most time of their own, and the host time per
step without cProfile (enqueue only, and with a synchronize after every step).

Usage: python experiments/scripts/probe39.py OUT_DIR
"""

import cProfile
import io
import pstats
import sys
import time

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    B, H, L, D, dtype = 1, 4, 512, 32, torch.bfloat16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    inputs = tk.make(B, H, L, D, dtype)
    dout = torch.randn_like(inputs[0])

    def step():
        torch.autograd.grad(attention(*inputs), inputs, dout)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(50):
            step()
        enqueue_ms = (time.perf_counter() - start) * 1000 / 50
        torch.cuda.synchronize()
        total_ms = (time.perf_counter() - start) * 1000 / 50
        synced = []
        for _ in range(20):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            synced.append((time.perf_counter() - t0) * 1000)
        tk.log(kind="host", enqueue_ms_per_step=enqueue_ms, ms_per_step_back_to_back=total_ms,
               ms_per_synced_step=sorted(synced), **shape)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
    tk.log(kind="cprofile", steps=50, table=out.getvalue().splitlines(), **shape)


if __name__ == "__main__":
    main()
