"""GPU probe 22: bias-gradient tiles of 64 queries x 128 keys with 8 warps (two warpgroups, each 64x64 of the
tile, sharing the q and dO loads) at every head dim. Probe 21 found them 6-10% faster end to end at D=128
(B=1 H=4 L=512 bf16; one program per SM, 197 KB of shared memory). Offline (Triton 3.6, sm_90): D=32 205
registers at 2 stages (one program of 8 warps per SM, against three of 4 warps now), D=64 220 (one of 8,
against two of 4). The kernel alone, launched as the custom op launches it, three times each in alternation,
outputs compared with the shipped config's (not bitwise: the row splits follow the tiles); then
forward+backward medians of the public `attention`, twice each.

Usage: python experiments/scripts/probe22.py OUT_DIR
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk
from dq_tma import dq_library
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import attention, ops

CUDA = torch.device("cuda")
P = True  # pipeline_all_loads


def dbias_library(q, k, v, bias, lse, delta, dout, scale):
    """The library's bias gradient, launched as attention_bwd launches it in eager mode (no mask)."""
    no_mask = ops._mask_args(None, q)
    common = ops.backward_constants(q, no_mask, scale)
    with set_wrap_triton_enabled(False):
        return ops._launch_dbias(dout, q, k, v, bias, no_mask, lse, delta, scale, common, ops._dbias_plan(q))


def one_target(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    dout = torch.randn_like(q)
    scale = D**-0.5
    shipped = ops.dbias_config(L, D, dtype, CUDA)
    variants = {"shipped": shipped, "64x128_w8_s2": ops.LaunchConfig(64, 128, 8, 2, 1, P)}
    if D < 128:
        variants["64x128_w8_s3"] = ops.LaunchConfig(64, 128, 8, 3, 1, P)
    with torch.no_grad():
        out, lse = tk.forward_op(q, k, v, bias, scale)
        _, delta = dq_library(q, k, v, bias, out, lse, dout, scale)

    def run(cfg):
        return tk.with_configs({"dbias_config": dataclasses.astuple(cfg)}, dbias_library, q, k, v, bias, lse, delta,
                               dout, scale)
    want = run(shipped)
    for name, cfg in variants.items():
        got = run(cfg)
        tk.log(kind="check", kernel="dbias", variant=name, rel_diff=tk.rel(got, want),
               splits=tk.with_configs({"dbias_config": dataclasses.astuple(cfg)}, ops._dbias_plan, q)[1], **shape)
    for repeat in range(3):
        for name, cfg in variants.items():
            ms, p20, p80 = triton.testing.do_bench(functools.partial(run, cfg), warmup=50, rep=300,
                                                   quantiles=[0.5, 0.2, 0.8])
            tk.log(kind="time", kernel="dbias", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
    inputs = (q, k, v, bias)

    def call():
        return attention(q, k, v, bias)
    for repeat in range(2):
        for name, cfg in variants.items():
            ms, p20, p80, peak = tk.with_configs({"dbias_config": dataclasses.astuple(cfg)}, tk.bench, call, inputs,
                                                 "fwd_bwd")
            tk.log(kind="time", mode="fwd_bwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for target in [(1, 4, 512, 128, torch.bfloat16), (4, 8, 512, 64, torch.float16),
                   (4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16),
                   (4, 8, 256, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16)]:
        one_target(*target)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
