"""GPU probe 42: where the host's time per eager forward+backward goes outside Triton's launches (probe 41: about
1 ms of the 1.5 ms per step at B=1 H=1 L=32 and B=1 H=4 L=512 bf16, against 0.08 ms outside the launch for a
forward under no_grad).

At B=1 H=1 L=32 D=32 bf16 (kernels of a few µs, so the host sets the pace): after a warm-up, 50 steps of
forward+backward under torch.profiler (CPU and CUDA activities: aten ops and CUDA runtime and driver calls, with
their self CPU time), then 50 under cProfile (the 40 functions with the most time of their own, and the 40 with
the most time in total), then the same two for 50 forwards under no_grad.

Usage: python experiments/scripts/probe42.py OUT_DIR
"""

import cProfile
import io
import pstats
import sys

import torch
import triton
import tune_kernels as tk
from torch.profiler import ProfilerActivity, profile

from flash_tt_attn import attention


def tables(step, steps, mode, shape):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
    tk.log(kind="torch_profiler", mode=mode, steps=steps, table=table.splitlines(), **shape)
    for sort in ("tottime", "cumulative"):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(40)
        tk.log(kind="cprofile", mode=mode, sort=sort, steps=steps, table=out.getvalue().splitlines(), **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    B, H, L = 1, 1, 32
    shape = dict(B=B, H=H, L=L, D=32, dtype="bfloat16")
    inputs = tk.make(B, H, L, 32, torch.bfloat16)
    dout = torch.randn_like(inputs[0])

    def forward_backward():
        torch.autograd.grad(attention(*inputs), inputs, dout)

    def forward():
        with torch.no_grad():
            attention(*inputs)

    tables(forward_backward, 50, "fwd_bwd", shape)
    tables(forward, 50, "fwd", shape)


if __name__ == "__main__":
    main()
