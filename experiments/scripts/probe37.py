"""GPU probe 37: where a compiled forward+backward at D=64 leaves the GPU idle (PERF.md next step 9; probes 30-32
found the compiled call 7-12% slower than eager with its kernels' device time within 2%, and no allocator calls).

For eager and `torch.compile(attention, fullgraph=True, dynamic=False)` at B=4 H=8 L=512 D=64 fp16, alternated
twice: eight forward+backward steps enqueued back to back (no per-call events or L2 flush, unlike do_bench) under
the torch profiler with CPU and CUDA activities. Logged per variant: the wall time of the eight steps, the GPU's
busy time (union of kernel intervals), the device time of each kernel (summed over the steps), the GPU's idle gaps
(the eight largest, with the kernels on either side and the host calls that ran during each gap), every CUDA runtime
call by count and total host time, and the host time each step took to enqueue its work.
(The first two runs, the first ten rows of h100-probe-37.jsonl, counted the steps' record_function ranges, which the
profiler also puts on the GPU's timeline, as kernels: their busy and idle figures may hide gaps; the first run also
lacks per-kernel sums.)

Usage: python experiments/scripts/probe37.py OUT_DIR
"""

import collections
import sys
import time

import torch
import triton
import tune_kernels as tk
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from flash_tt_attn import attention

STEPS = 8


def intervals(events, device_type):
    """(start, end, name) of the events on device_type, without the steps' own annotations (record_function
    ranges also appear on the GPU's timeline, and counted as busy time they would hide gaps)."""
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == device_type and not e.name.startswith("probe37_step"))


def analyse(prof, wall_ms):
    events = prof.events()
    kernels = intervals(events, DeviceType.CUDA)
    busy, gaps, end, previous = 0.0, [], None, ""
    for start, stop, name in kernels:
        if end is not None and start > end:
            gaps.append((start - end, end, start, previous, name))
        if end is None or stop > end:
            busy += stop - max(start, end if end is not None else start)
            end, previous = stop, name
    host = [e for e in events if e.device_type == DeviceType.CPU]
    runtime = collections.defaultdict(lambda: [0, 0.0])
    for e in host:
        if e.name.startswith(("cuda", "cu")) and not e.name.startswith("cudnn"):
            runtime[e.name][0] += 1
            runtime[e.name][1] += e.time_range.end - e.time_range.start
    steps = [(e.time_range.end - e.time_range.start) / 1000 for e in host if e.name.startswith("probe37_step")]
    largest = []
    for width, gap_start, gap_end, before, after in sorted(gaps, reverse=True)[:8]:
        during = collections.Counter(e.name for e in host
                                     if e.time_range.start < gap_end and e.time_range.end > gap_start
                                     and not e.name.startswith("probe37_step"))
        largest.append(dict(us=width, before=before[:60], after=after[:60],
                            host_calls=[f"{n[:50]} x{c}" for n, c in during.most_common(8)]))
    per_kernel = collections.defaultdict(float)
    for start, stop, name in kernels:
        per_kernel[name[:60]] += (stop - start) / 1000
    return dict(wall_ms=wall_ms, kernel_busy_ms=busy / 1000,
                kernel_ms={n: round(t, 3) for n, t in sorted(per_kernel.items())},
                idle_ms=sum(g[0] for g in gaps) / 1000,
                gaps_over_50us=sum(1 for g in gaps if g[0] > 50), enqueue_ms_per_step=steps, largest_gaps=largest,
                runtime_calls={n: [c, round(t / 1000, 3)] for n, (c, t) in sorted(runtime.items())})


def traced_steps(step):
    """Three warm-up steps, then STEPS steps back to back under the profiler: analyse()'s fields."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(STEPS):
            with record_function(f"probe37_step{i}"):
                step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
    return analyse(prof, wall_ms)


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
        tk.log(kind="trace", variant=name, steps=STEPS, **shape, **traced_steps(step))


if __name__ == "__main__":
    main()
