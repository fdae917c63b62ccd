"""GPU probe 27: D=128 tiles that keep the loop-invariant operand in shared memory (LaunchConfig.prescale
False: the scale multiplies the fp32 product) so that larger or more programs fit in the register file.

At D=128 the shipped forward and dq (64x64 tiles, 4 warps) read 10 bytes of k, v and bias per score from L2
(32 KB of k and v and 8 KB of bias per 64x64 tile); with 1.1 and ~1 ms per call at B=1 H=4 L=512 that is
5-6 TB/s, near what an H100's L2 delivers. 128-query tiles halve the k and v bytes per score, but with q
scaled in registers they need 186-220 registers (one program of 8 warps per SM; probes 11, 20, 23: slower).
Offline (Triton 3.6, sm_90), with q left in shared memory:
- forward 128x32, 8 warps, capped at 128 registers: 127, no spills (2 programs of 8 warps per SM; 98 KB of
  shared memory at 3 stages, 74 KB at 2), 6 bytes per score;
- forward 64x64 capped at 168: no spills, three programs of 4 warps per SM instead of two;
- dq 128x32, 8 warps, 2 stages, capped at 128: 128, no spills, 106 KB (two programs per SM);
- dq 64x32 unscaled: 155 registers (three programs);
- dk/dv 64x64 (shipped): 255 registers with 88 bytes of spills; 32x64: 230-240, no spills.
Parts: A the forward alone (two shapes, three timings each in alternation, flex in the same process);
B dq alone and C dk/dv alone (launched as the op launches them, three timings each); D forward+backward of
the public `attention` under combinations, twice each, against flex. Outputs compared with the shipped
configs' (relative L2 difference).

Usage: python experiments/scripts/probe27.py OUT_DIR
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk
from dkdv_tma import dkdv_library
from dq_tma import dq_library

from flash_tt_attn import attention, ops

CUDA = torch.device("cuda")
LC = ops.LaunchConfig


def cfg(block_j, block_k, warps, stages, prescale=False, max_registers=None, key_major_bias=False):
    return LC(block_j, block_k, warps, stages, pipeline_all_loads=True, key_major_bias=key_major_bias,
              max_registers=max_registers, prescale=prescale)


FORWARD = {
    "shipped": None,
    "u128x32_w8_s3_r128": cfg(128, 32, 8, 3, max_registers=128),
    "u128x32_w8_s2_r128": cfg(128, 32, 8, 2, max_registers=128),
    "u64x64_s2_r168": cfg(64, 64, 4, 2, max_registers=168),
    "u64x32_s3": cfg(64, 32, 4, 3),
    "u128x64_w8_s3": cfg(128, 64, 8, 3),
}
DQ = {
    "shipped": None,
    "u128x32_w8_s2_r128": cfg(128, 32, 8, 2, max_registers=128),
    "u128x32_w8_s3_r128": cfg(128, 32, 8, 3, max_registers=128),
    "u64x32_s2": cfg(64, 32, 4, 2),
    "q64x32_s2": cfg(64, 32, 4, 2, prescale=True),
    "u64x64_s2": cfg(64, 64, 4, 2),
}
DKDV = {
    "shipped": None,
    "u32x64_s2": cfg(32, 64, 4, 2, key_major_bias=True),
    "u32x64_s3": cfg(32, 64, 4, 3, key_major_bias=True),
    "q32x64_s3": cfg(32, 64, 4, 3, prescale=True, key_major_bias=True),
    "u64x64_s2": cfg(64, 64, 4, 2, key_major_bias=True),
}
COMBOS = {
    "shipped": {},
    "wide": {"forward_config": FORWARD["u128x32_w8_s3_r128"], "dq_config": DQ["u128x32_w8_s2_r128"],
             "dkdv_config": DKDV["u32x64_s3"]},
    "narrow": {"forward_config": FORWARD["u64x64_s2_r168"], "dq_config": DQ["u64x32_s2"],
               "dkdv_config": DKDV["q32x64_s3"]},
}


def configs_of(chooser, config):
    return {} if config is None else {chooser: dataclasses.astuple(config)}


def timed(fn, shape, **fields):
    ms, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    tk.log(kind="time", ms=ms, p20=p20, p80=p80, **fields, **shape)


def part_a(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D**-0.5

    def run(name):
        return tk.with_configs(configs_of("forward_config", FORWARD[name]), tk.forward_op, q, k, v, bias, scale)
    with torch.no_grad():
        want = run("shipped")
        for name in FORWARD:
            out, lse = run(name)
            tk.log(kind="check", kernel="fwd", variant=name, rel_diff=[tk.rel(out, want[0]), tk.rel(lse, want[1])],
                   **shape)
        for repeat in range(3):
            for name in FORWARD:
                timed(functools.partial(run, name), shape, kernel="fwd", variant=name, rep=repeat)
        fn, _ = tk.flex_setup(q, k, v, bias)
        for repeat in range(2):
            timed(fn, shape, provider="flex", mode="fwd", rep=repeat)


def part_bc(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    dout = torch.randn_like(q)
    scale = D**-0.5
    with torch.no_grad():
        out, lse = tk.forward_op(q, k, v, bias, scale)

        def run_dq(name):
            return tk.with_configs(configs_of("dq_config", DQ[name]), dq_library, q, k, v, bias, out, lse, dout,
                                   scale)
        want_dq, delta = run_dq("shipped")

        def run_dkdv(name):
            return tk.with_configs(configs_of("dkdv_config", DKDV[name]), dkdv_library, q, k, v, bias, lse, delta,
                                   dout, scale)
        want_dkdv = run_dkdv("shipped")
        for name in DQ:
            got, got_delta = run_dq(name)
            tk.log(kind="check", kernel="dq", variant=name, rel_diff=[tk.rel(got, want_dq), tk.rel(got_delta, delta)],
                   **shape)
        for name in DKDV:
            got = run_dkdv(name)
            tk.log(kind="check", kernel="dkdv", variant=name,
                   rel_diff=[tk.rel(a, b) for a, b in zip(got, want_dkdv, strict=True)], **shape)
        for repeat in range(3):
            for name in DQ:
                timed(functools.partial(run_dq, name), shape, kernel="dq", variant=name, rep=repeat)
        for repeat in range(3):
            for name in DKDV:
                timed(functools.partial(run_dkdv, name), shape, kernel="dkdv", variant=name, rep=repeat)


def part_d(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)

    def call():
        return attention(q, k, v, bias)

    def grads():
        return torch.autograd.grad(call(), inputs, dout)

    def configs(name):
        return {chooser: dataclasses.astuple(c) for chooser, c in COMBOS[name].items()}
    want = grads()
    for name in COMBOS:
        got = tk.with_configs(configs(name), grads)
        tk.log(kind="check", mode="fwd_bwd", variant=name,
               rel_diff=[tk.rel(a, b) for a, b in zip(got, want, strict=True)], **shape)
    for repeat in range(2):
        for name in COMBOS:
            ms, p20, p80, peak = tk.with_configs(configs(name), tk.bench, call, inputs, "fwd_bwd")
            tk.log(kind="time", mode="fwd_bwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)
    fn, flex_inputs = tk.flex_setup(q, k, v, bias)
    for repeat in range(2):
        ms, p20, p80, peak = tk.bench(fn, flex_inputs, "fwd_bwd")
        tk.log(kind="time", provider="flex", mode="fwd_bwd", rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
               **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    target = (1, 4, 512, 128, torch.bfloat16)
    part_a(*target)
    torch.cuda.empty_cache()
    part_a(1, 4, 1024, 128, torch.bfloat16)
    torch.cuda.empty_cache()
    part_bc(*target)
    torch.cuda.empty_cache()
    part_d(*target)


if __name__ == "__main__":
    main()
