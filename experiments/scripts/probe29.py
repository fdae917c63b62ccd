"""GPU probe 29, after v16: D=64 (B=4 H=8 L=512 fp16) dk/dv and forward with the operand in shared memory.

A. dk/dv alone. Shipped: 64x64, 3 stages, row-major bias, k scaled in registers: 228 registers (two programs
   per SM), 479 instructions per loop iteration offline (Triton 3.6, sm_90; 61 byte permutes for the
   transposed bias tiles). Variants, k unscaled in shared memory: the same tiles (222 registers, 494
   instructions), on the key-major bias copy (215 registers, 419 instructions: no permutes) and 32x64 steps
   on the row-major bias (167 registers: three programs per SM, 292 instructions per half-size step).
B. The forward alone, shipped (64x64, 143 registers, three programs of 4 warps per SM) against 128x64 with
   8 warps and q in shared memory capped at 128 registers (two programs of 8 warps; no spills without a
   mask, 20 bytes with one), which probe 28 timed 3.92-4.38 against 4.21-4.65 ms: five timings each in
   alternation this time.
Outputs against the shipped configs' (relative L2 difference); then forward+backward of the public
`attention` with the fastest dk/dv of part A, twice each against shipped.

Usage: python experiments/scripts/probe29.py OUT_DIR
"""

import functools
import sys

import torch
import triton
import tune_kernels as tk
from dkdv_tma import dkdv_library
from dq_tma import dq_library
from probe27 import cfg, configs_of, timed

from flash_tt_attn import attention

DKDV = {
    "shipped": None,
    "u64x64_s3": cfg(64, 64, 4, 3),
    "u64x64_s3_km": cfg(64, 64, 4, 3, key_major_bias=True),
    "u32x64_s3": cfg(32, 64, 4, 3),
}
FORWARD = {"shipped": None, "u128x64_w8_s3_r128": cfg(128, 64, 8, 3, max_registers=128)}


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    B, H, L, D, dtype = 4, 8, 512, 64, torch.float16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    dout = torch.randn_like(q)
    scale = D**-0.5
    with torch.no_grad():
        out, lse = tk.forward_op(q, k, v, bias, scale)
        _, delta = dq_library(q, k, v, bias, out, lse, dout, scale)

        def run_dkdv(name):
            return tk.with_configs(configs_of("dkdv_config", DKDV[name]), dkdv_library, q, k, v, bias, lse, delta,
                                   dout, scale)

        def run_fwd(name):
            return tk.with_configs(configs_of("forward_config", FORWARD[name]), tk.forward_op, q, k, v, bias, scale)
        want = run_dkdv("shipped")
        for name in DKDV:
            diffs = [tk.rel(a, b) for a, b in zip(run_dkdv(name), want, strict=True)]
            tk.log(kind="check", kernel="dkdv", variant=name, rel_diff=diffs, **shape)
        for name in FORWARD:
            diffs = [tk.rel(a, b) for a, b in zip(run_fwd(name), (out, lse), strict=True)]
            tk.log(kind="check", kernel="fwd", variant=name, rel_diff=diffs, **shape)
        for repeat in range(3):
            for name in DKDV:
                timed(functools.partial(run_dkdv, name), shape, kernel="dkdv", variant=name, rep=repeat)
        for repeat in range(5):
            for name in FORWARD:
                timed(functools.partial(run_fwd, name), shape, kernel="fwd", variant=name, rep=repeat)
    timings = [r for r in tk.rows if r["kind"] == "time" and r.get("kernel") == "dkdv"]
    times = {name: min(r["ms"] for r in timings if r["variant"] == name) for name in DKDV}
    best = min(times, key=times.get)
    inputs = (q, k, v, bias)

    def call():
        return attention(q, k, v, bias)
    variants = {"shipped": {}, f"dkdv_{best}": configs_of("dkdv_config", DKDV[best])}
    for repeat in range(2):
        for name, configs in variants.items():
            ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, "fwd_bwd")
            tk.log(kind="time", mode="fwd_bwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)


if __name__ == "__main__":
    main()
