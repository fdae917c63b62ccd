"""GPU probe 32: why compiled forward+backward leaves the GPU idle at D=64 (B=4 H=8 L=512 fp16). Probe 31 found the
compiled call's kernels within 2% of eager's device time while the whole call took 9-11% longer (probe 30).
For eager and `torch.compile(attention, fullgraph=True, dynamic=False)`: ten forward+backward steps, each timed
on the host (synchronized), and the caching allocator's counters over them (`torch.cuda.memory_stats()`:
cudaMalloc and cudaFree calls, allocation retries, which free cached blocks and synchronize), plus the device
time of every kernel in one profiled step.

Usage: python experiments/scripts/probe32.py OUT_DIR
"""

import sys
import time

import torch
import triton
import tune_kernels as tk
from probe31 import kernel_times

from flash_tt_attn import attention

COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    B, H, L, D, dtype = 4, 8, 512, 64, torch.float16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)
    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    for name, fn in (("eager", attention), ("compiled", compiled), ("eager", attention), ("compiled", compiled)):
        def step(fn=fn):
            torch.autograd.grad(fn(q, k, v, bias), inputs, dout)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        host_ms = []
        for _ in range(10):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            host_ms.append((time.perf_counter() - start) * 1000)
        after = torch.cuda.memory_stats()
        counters = {c: after.get(c, 0) - before.get(c, 0) for c in COUNTERS}
        kernels_ms = sum(ms for _, _, ms in kernel_times(step, runs=3))
        tk.log(kind="steps", variant=name, host_ms=sorted(host_ms), kernels_ms_per_step=kernels_ms,
               reserved_mb=after["reserved_bytes.all.current"] / 2**20, **counters, **shape)


if __name__ == "__main__":
    main()
