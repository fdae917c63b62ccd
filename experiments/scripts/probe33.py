"""GPU probe 33, after v16: flex's own backward tiles at D=128 (B=1 H=4 L=512 bf16), with the loop-invariant
operand in shared memory. Flex's sm90 backward config at D=128 is 128 keys by 64-query steps for dk/dv and 128
queries by 64-key steps for dq, 8 warps, 3 stages. Offline (Triton 3.6, sm_90), ours:
- dk/dv 64x128 (queries x keys), 8 warps: 255 registers and 28-40 bytes of spills; 32x128 at 3 stages: 238,
  no spills, 129 KB of shared memory (one program of 8 warps per SM, as v16's 32x64 runs two of 4), which reads
  half the q and dO bytes per score;
- dq 128x64, 8 warps: 199 registers at 2 and 3 stages (one program of 8 warps; v16's 128x32 runs two under a
  128-register cap).
The kernels alone, launched as the op launches them, three timings each in alternation (probe 27's part B/C).

Usage: python experiments/scripts/probe33.py OUT_DIR
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
    probe27.DQ = {"shipped": None, "u128x64_w8_s3": cfg(128, 64, 8, 3), "u128x64_w8_s2": cfg(128, 64, 8, 2)}
    probe27.DKDV = {"shipped": None, "u32x128_w8_s3_km": cfg(32, 128, 8, 3, key_major_bias=True),
                    "u32x128_w8_s2_km": cfg(32, 128, 8, 2, key_major_bias=True)}
    probe27.part_bc(1, 4, 512, 128, torch.bfloat16)


if __name__ == "__main__":
    main()
