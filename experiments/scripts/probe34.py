"""GPU probe 34, after v17: one more pipeline stage at D=128 (B=1 H=4 L=512 bf16, and the forward at L=1024 too).
Offline (Triton 3.6, sm_90): the forward's 128x64 tile at 4 stages needs 208 KB of shared memory and 186
registers (219 at 3 stages; one program of 8 warps per SM either way); dk/dv's 32x64 steps at 4 stages need
109 KB and 231 registers (two programs of 4 warps per SM, as at 3 stages). Each runs one program's loads a
stage further ahead. The kernels alone, three timings each in alternation (probe 27's parts A to C).

Usage: python experiments/scripts/probe34.py OUT_DIR
"""

import sys

import probe27
import torch
import triton
import tune_kernels as tk
from probe27 import cfg


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    probe27.FORWARD = {"shipped": None, "u128x64_w8_s4": cfg(128, 64, 8, 4)}
    probe27.DQ = {"shipped": None}
    probe27.DKDV = {"shipped": None, "u32x64_s4_km": cfg(32, 64, 4, 4, key_major_bias=True)}
    probe27.part_a(1, 4, 512, 128, torch.bfloat16)
    probe27.part_a(1, 4, 1024, 128, torch.bfloat16)
    probe27.part_bc(1, 4, 512, 128, torch.bfloat16)


if __name__ == "__main__":
    main()
