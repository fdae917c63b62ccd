"""GPU probe 41: how the host's time per eager call divides between Triton's launches and everything else.

At a shape whose kernels take a few µs (B=1 H=1 L=32 D=32 bf16), so that the host, not the GPU, sets the pace,
and at B=1 H=4 L=512 bf16 (the host-bound target of probes 38-40): the host's time per call (forward under
no_grad, and forward+backward), 500 calls back to back after a warm-up, and inside it the time spent in the
Triton launches alone (each `kernel[grid](...)` call timed by a wrapper around wrap_triton) and per kernel.
Three rounds.

Usage: python experiments/scripts/probe41.py OUT_DIR
"""

import collections
import sys
import time

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention, ops

launch_seconds = collections.defaultdict(float)
launch_counts = collections.Counter()
_wrap_triton = ops.wrap_triton


class _TimedLaunch:
    """wrap_triton(kernel)[grid](...), with the call's host time added to launch_seconds[kernel name]."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launcher = _wrap_triton(self.kernel)[grid]
        name = getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

        def launch(*args, **kwargs):
            start = time.perf_counter()
            result = launcher(*args, **kwargs)
            launch_seconds[name] += time.perf_counter() - start
            launch_counts[name] += 1
            return result
        return launch


def host_time(step, n):
    """Seconds per step of the host, n steps back to back, and the launches' seconds per step by kernel."""
    launch_seconds.clear()
    launch_counts.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    per_kernel = {name: seconds / n * 1e6 for name, seconds in launch_seconds.items()}
    return host * 1e6, per_kernel, {name: count / n for name, count in launch_counts.items()}


def measure_shape(B, H, L):
    shape = dict(B=B, H=H, L=L, D=32, dtype="bfloat16")
    inputs = tk.make(B, H, L, 32, torch.bfloat16)
    dout = torch.randn_like(inputs[0])

    def forward():
        with torch.no_grad():
            attention(*inputs)

    def forward_backward():
        torch.autograd.grad(attention(*inputs), inputs, dout)

    for mode, step in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for _ in range(20):
            step()
        for round_ in range(3):
            host_us, per_kernel, counts = host_time(step, 500 if L == 32 else 100)
            tk.log(kind="host", mode=mode, round=round_, host_us_per_step=host_us,
                   launch_us_per_step=sum(per_kernel.values()), launch_us_by_kernel=per_kernel,
                   launches_per_step=counts, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    ops.wrap_triton = _TimedLaunch
    for B, H, L in ((1, 1, 32), (1, 4, 512)):
        measure_shape(B, H, L)
    ops.wrap_triton = _wrap_triton


if __name__ == "__main__":
    main()
