"""GPU probe 31: where compiled forward+backward calls lose time. Probe 30 found `torch.compile(attention)` 7-12%
slower than eager in forward+backward at D=64 (B=4 H=8 L=512 fp16), where no config has a register cap, and 8%
at D=128 (B=1 H=4 L=512 bf16) whichever dq config the traced launch gets; forwards equal. This profiles five
forward+backward calls of each (torch profiler, CUDA activity) and logs every GPU kernel's name, calls and
total device time, so the two lists can be compared kernel by kernel.

Usage: python experiments/scripts/probe31.py OUT_DIR
"""

import sys

import torch
import triton
import tune_kernels as tk
from torch.profiler import ProfilerActivity, profile

from flash_tt_attn import attention


def kernel_times(fn, runs=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return [(e.key, e.count, e.device_time_total / 1000 / runs) for e in prof.key_averages()
            if e.device_time_total > 0]


def one_target(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    torch._dynamo.reset()
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)
    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    for name, fn in (("eager", attention), ("compiled", compiled)):
        def step(fn=fn):
            torch.autograd.grad(fn(q, k, v, bias), inputs, dout)
        for key, count, ms in sorted(kernel_times(step), key=lambda row: -row[2]):
            tk.log(kind="kernel", variant=name, kernel=key[:120], calls_per_step=count / 5, ms_per_step=ms, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    one_target(4, 8, 512, 64, torch.float16)
    torch.cuda.empty_cache()
    one_target(1, 4, 512, 128, torch.bfloat16)


if __name__ == "__main__":
    main()
