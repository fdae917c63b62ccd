"""GPU probe 20, two questions in one process:

A. Head dim 128 (B=1 H=4 L=512 bf16, the `headdims` row where we trail flex: 0.89x forward, 0.77x
   forward+backward). Offline (Triton 3.6, sm_90) the shipped dk/dv config spills (255 registers, 88 bytes);
   with 32-query blocks it needs 240 and none. Forward and forward+backward medians of the public
   `attention` under each kernel config (ops' choosers patched), twice each in alternation, flex in the same
   process, and every variant's gradients against an fp64 reference.
B. The bias as fp32. At D=32 every dq and dk/dv iteration converts its 16-bit bias tile to the fp32 product
   accumulator (32 HADD2 of dq's 275 instructions per iteration, of dk/dv's 361), and the forward also copies
   it for its second row. An fp32 copy of the bias (B*H*L^2 elements, small beside q) removes the conversion;
   the kernels need no change (their `.to(ACC_DTYPE)` becomes a no-op). Each kernel launched as the custom op
   launches it, with the 16-bit bias and with an fp32 copy (dk/dv: a key-major fp32 copy), outputs compared
   bitwise (the conversion is exact), each timed twice in alternation; the forward also with 2 stages, which
   the larger fp32 bias tile may need to keep three programs per SM.

Usage: python experiments/scripts/probe20.py OUT_DIR
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


def time_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])


def part_a():
    B, H, L, D, dtype = 1, 4, 512, 128, torch.bfloat16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)
    ref = tk.fp64_reference(inputs, dout)

    def call():
        return attention(q, k, v, bias)

    def cfg(name):
        return dataclasses.astuple(getattr(ops, name)(L, D, dtype, CUDA))

    fwd = cfg("forward_config")
    dq, dkdv, dbias = cfg("dq_config"), cfg("dkdv_config"), cfg("dbias_config")
    P, KM = True, True
    forward_variants = {
        "shipped": {},
        "f64x32_s2": {"forward_config": (64, 32, 4, 2, 1, P)},
        "f64x32_s3": {"forward_config": (64, 32, 4, 3, 1, P)},
        "f128x32_w8_s2": {"forward_config": (128, 32, 8, 2, 1, P)},
        "f128x32_w8_s3": {"forward_config": (128, 32, 8, 3, 1, P)},
        "f64x64_s3": {"forward_config": (64, 64, 4, 3, 1, P)},
    }
    backward_variants = {
        "shipped": {},
        "dkdv32x64_s2": {"dkdv_config": (32, 64, 4, 2, 1, P, KM)},
        "dkdv32x64_s3": {"dkdv_config": (32, 64, 4, 3, 1, P, KM)},
        "dkdv32x128_w8_s2": {"dkdv_config": (32, 128, 8, 2, 1, P, KM)},
        "dq64x32_s2": {"dq_config": (64, 32, 4, 2, 1, P)},
        "dq64x32_s3": {"dq_config": (64, 32, 4, 3, 1, P)},
        "dq128x32_w8_s2": {"dq_config": (128, 32, 8, 2, 1, P)},
        "dbias64x64_s2": {"dbias_config": (64, 64, 4, 2, 1, P)},
        "dbias32x64_s2": {"dbias_config": (32, 64, 4, 2, 1, P)},
        "dkdv32x64_s2+dq64x32_s2": {"dkdv_config": (32, 64, 4, 2, 1, P, KM), "dq_config": (64, 32, 4, 2, 1, P)},
    }
    tk.log(kind="shipped", forward=fwd, dq=dq, dkdv=dkdv, dbias=dbias, **shape)
    for name, configs in backward_variants.items():
        try:
            got = tk.with_configs(configs, tk.output_and_grads, call, inputs, dout)
            tk.log(kind="check", variant=name, rel_err=[tk.rel(a, b) for a, b in zip(got, ref, strict=True)],
                   nan=any(bool(torch.isnan(t).any()) for t in got), **shape)
        except Exception as e:  # noqa: BLE001
            tk.log(kind="check", variant=name, error=repr(e)[:300], **shape)
    for mode, variants in (("fwd", forward_variants), ("fwd_bwd", backward_variants)):
        for repeat in range(2):
            for name, configs in variants.items():
                try:
                    ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, mode)
                    tk.log(kind="time", provider="flash_tt_attn", mode=mode, variant=name, rep=repeat, ms=ms,
                           p20=p20, p80=p80, peak_mb=peak, **shape)
                except Exception as e:  # noqa: BLE001
                    tk.log(kind="time", mode=mode, variant=name, error=repr(e)[:300], **shape)
        fn, flex_inputs = tk.flex_setup(q, k, v, bias)
        for repeat in range(2):
            ms, p20, p80, peak = tk.bench(fn, flex_inputs, mode)
            tk.log(kind="time", provider="flex", mode=mode, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)
    torch.cuda.empty_cache()


def key_major_fp32(bias):
    """The bias as fp32, strided key-major (ops' key-major copy, in fp32): one copy."""
    return torch.empty_like(bias.mT, dtype=torch.float32, memory_format=torch.contiguous_format).copy_(bias.mT).mT


def part_b():
    for target in [(4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16),
                   (4, 8, 256, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16)]:
        part_b_target(*target)
        torch.cuda.empty_cache()


def part_b_target(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    dout = torch.randn_like(q)
    scale = D**-0.5
    bias32 = bias.float()
    bias32_km = key_major_fp32(bias)
    out, lse = tk.forward_op(q, k, v, bias, scale)
    _, delta = dq_library(q, k, v, bias, out, lse, dout, scale)
    shipped_fwd = dataclasses.astuple(ops.forward_config(L, D, dtype, CUDA))
    two_stages = dataclasses.astuple(dataclasses.replace(ops.forward_config(L, D, dtype, CUDA), num_stages=2))

    def forward(b, stages):
        return tk.with_configs({"forward_config": stages}, tk.forward_op, q, k, v, b, scale)

    kernels = {
        "fwd": {"bias16": functools.partial(forward, bias, shipped_fwd),
                "bias16_s2": functools.partial(forward, bias, two_stages),
                "bias32": functools.partial(forward, bias32, shipped_fwd),
                "bias32_s2": functools.partial(forward, bias32, two_stages)},
        "dq": {"bias16": functools.partial(dq_library, q, k, v, bias, out, lse, dout, scale),
               "bias32": functools.partial(dq_library, q, k, v, bias32, out, lse, dout, scale)},
        "dkdv": {"bias16": functools.partial(dkdv_library, q, k, v, bias, lse, delta, dout, scale),
                 "bias32": functools.partial(dkdv_library, q, k, v, bias32_km, lse, delta, dout, scale)},
    }
    for kernel, variants in kernels.items():
        want = variants["bias16"]()
        for name, fn in variants.items():
            got = fn()
            tk.log(kind="check", kernel=kernel, variant=name,
                   bitwise_equal=all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), **shape)
        for repeat in range(2):
            for name, fn in variants.items():
                ms, p20, p80 = time_ms(fn)
                tk.log(kind="time", kernel=kernel, variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
    # What the copies cost, per call.
    for name, fn in {"copy_fp32": bias.float, "copy_fp32_key_major": functools.partial(key_major_fp32, bias),
                     "copy_fp16_key_major": lambda: bias.mT.contiguous()}.items():
        ms, p20, p80 = time_ms(fn)
        tk.log(kind="time", kernel=name, ms=ms, p20=p20, p80=p80, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    part_b()
    part_a()


if __name__ == "__main__":
    main()
