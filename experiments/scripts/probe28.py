"""GPU probe 28, after probe 27 (its helpers): the same idea at D=64 (B=4 H=8 L=512 fp16), and probe 27's best
D=128 configs together.

A. D=64 forward alone: shipped (64x64, 4 warps, 3 stages, q scaled: 143 registers, three programs per SM)
   against 128x64 with 8 warps and q in shared memory (flex's D=64 tile is 128x128 with 4 warps): capped at
   128 registers (no spills offline; two programs of 8 warps) at 3 and 2 stages, and uncapped (138: one).
B. D=64 dq alone: shipped (64x64, 3 stages, 146 registers) against 128x64 8 warps 2 stages capped at 128
   (no spills, 80 KB) and 128x32 8 warps 3 stages (116 registers, 72 KB).
C. D=128 (B=1 H=4 L=512 bf16), the forward alone and forward+backward of the public `attention`, shipped
   against probe 27's fastest per kernel together: forward 128x64 8 warps 3 stages unscaled (flex's tile),
   dq 128x32 8 warps 2 stages unscaled capped at 128, dk/dv 32x64 3 stages unscaled; three timings each in
   alternation.

Usage: python experiments/scripts/probe28.py OUT_DIR
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk
from dq_tma import dq_library
from probe27 import cfg, configs_of, timed

from flash_tt_attn import attention

FORWARD_64 = {
    "shipped": None,
    "u128x64_w8_s3_r128": cfg(128, 64, 8, 3, max_registers=128),
    "u128x64_w8_s2_r128": cfg(128, 64, 8, 2, max_registers=128),
    "u128x64_w8_s3": cfg(128, 64, 8, 3),
}
DQ_64 = {
    "shipped": None,
    "u128x64_w8_s2_r128": cfg(128, 64, 8, 2, max_registers=128),
    "u128x32_w8_s3": cfg(128, 32, 8, 3),
}
NEW_128 = {"forward_config": cfg(128, 64, 8, 3), "dq_config": cfg(128, 32, 8, 2, max_registers=128),
           "dkdv_config": cfg(32, 64, 4, 3, key_major_bias=True)}


def part_ab(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    dout = torch.randn_like(q)
    scale = D**-0.5

    def run_fwd(name):
        return tk.with_configs(configs_of("forward_config", FORWARD_64[name]), tk.forward_op, q, k, v, bias, scale)

    def run_dq(name, out, lse):
        return tk.with_configs(configs_of("dq_config", DQ_64[name]), dq_library, q, k, v, bias, out, lse, dout, scale)
    with torch.no_grad():
        want = run_fwd("shipped")
        for name in FORWARD_64:
            out, lse = run_fwd(name)
            tk.log(kind="check", kernel="fwd", variant=name, rel_diff=[tk.rel(out, want[0]), tk.rel(lse, want[1])],
                   **shape)
        want_dq = run_dq("shipped", *want)
        for name in DQ_64:
            got = run_dq(name, *want)
            diffs = [tk.rel(a, b) for a, b in zip(got, want_dq, strict=True)]
            tk.log(kind="check", kernel="dq", variant=name, rel_diff=diffs, **shape)
        for repeat in range(3):
            for name in FORWARD_64:
                timed(functools.partial(run_fwd, name), shape, kernel="fwd", variant=name, rep=repeat)
        for repeat in range(3):
            for name in DQ_64:
                timed(functools.partial(run_dq, name, *want), shape, kernel="dq", variant=name, rep=repeat)


def part_c(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)
    variants = {"shipped": {}, "new": {c: dataclasses.astuple(x) for c, x in NEW_128.items()}}

    def call():
        return attention(q, k, v, bias)
    reference = tk.fp64_reference(inputs, dout)
    for name, configs in variants.items():
        got = tk.with_configs(configs, tk.output_and_grads, call, inputs, dout)
        tk.log(kind="check", mode="fwd_bwd", variant=name, against="fp64",
               rel_diff=[tk.rel(a, b) for a, b in zip(got, reference, strict=True)], **shape)
    for mode in ("fwd", "fwd_bwd"):
        for repeat in range(3):
            for name, configs in variants.items():
                ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, mode)
                tk.log(kind="time", mode=mode, variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                       **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    part_ab(4, 8, 512, 64, torch.float16)
    torch.cuda.empty_cache()
    part_c(1, 4, 512, 128, torch.bfloat16)


if __name__ == "__main__":
    main()
