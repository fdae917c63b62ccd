"""GPU probe 47: the host's time per eager call with the launchers' grids computed by ops.cdiv (plain integer
arithmetic) against triton.cdiv (a Triton constexpr_function, about 2 µs a call on the host), alternated in
three rounds, at B=1 H=1 L=32 (host-bound) and B=1 H=4 L=512 D=32 bf16: forward under no_grad and
forward+backward, 500 (L=32) or 100 calls back to back (probe 41's measure).

Usage: python experiments/scripts/probe47.py OUT_DIR
"""

import sys
import time

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention, ops

CDIVS = {"ops.cdiv": ops.cdiv, "triton.cdiv": triton.cdiv}


def host_us(step, n):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


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
            for name, cdiv in CDIVS.items():
                ops.cdiv = cdiv
                step()
                tk.log(kind="host", cdiv=name, mode=mode, round=round_,
                       host_us_per_call=host_us(step, 500 if L == 32 else 100), **shape)
    ops.cdiv = CDIVS["ops.cdiv"]


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L in ((1, 1, 32), (1, 4, 512)):
        measure_shape(B, H, L)


if __name__ == "__main__":
    main()
