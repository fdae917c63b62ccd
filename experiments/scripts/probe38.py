"""GPU probe 38: is the small target host-bound? Probe 37's trace (eight back-to-back forward+backward steps under
the profiler, host and device activities) of eager calls at B=1 H=4 L=512 D=32 bf16, the target whose
forward+backward timings spread widest (20th-80th percentiles 1.5-2.2 ms in earlier runs, PERF.md next step 6),
and at B=4 H=8 L=256 fp16 for comparison, each traced three times.

Usage: python experiments/scripts/probe38.py OUT_DIR
"""

import sys

import torch
import triton
import tune_kernels as tk
from probe37 import STEPS, traced_steps

from flash_tt_attn import attention


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in [(1, 4, 512, 32, torch.bfloat16), (4, 8, 256, 32, torch.float16)]:
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        q, k, v, bias = tk.make(B, H, L, D, dtype)
        inputs = (q, k, v, bias)
        dout = torch.randn_like(q)

        def step(inputs=inputs, dout=dout):
            torch.autograd.grad(attention(*inputs), inputs, dout)
        for block in range(3):
            tk.log(kind="trace", variant="eager", block=block, steps=STEPS, **shape, **traced_steps(step))


if __name__ == "__main__":
    main()
