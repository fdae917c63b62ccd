"""GPU probe 23, after v15:

A. The D=128 forward (B=1 H=4 L=512 bf16, 0.89x flex). It scales q once per program in registers
   (Q_PRESCALED), and Triton then feeds q·kᵀ its A operand from registers: offline (Triton 3.6, sm_90) 228
   registers at 64x64 tiles. Unscaled, q stays in shared memory and the scale multiplies the fp32 product:
   194 registers at 64x64, 142 at 64x32 with 3 stages (72 KB of shared memory: three programs per SM
   instead of two). Forward medians under each, twice in alternation, flex in the same process, outputs
   against the shipped forward's.
B. dk/dv at D=64 (B=4 H=8 L=512 fp16) on 128-key tiles with 8 warps (each warpgroup 64 keys, sharing the q,
   dO, lse and delta loads, as v15's bias gradient shares q and dO): offline 207 registers, one program of
   8 warps per SM against two of 4 now. Forward+backward medians of the public `attention`, twice each,
   gradients against the shipped config's.

Usage: python experiments/scripts/probe23.py OUT_DIR
"""

import contextlib
import sys

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention, ops

P, KM = True, True  # pipeline_all_loads, key_major_bias


@contextlib.contextmanager
def q_unscaled():
    """The kernels apply the scale to the fp32 product instead of scaling q (as for fp16 with |scale| > 1)."""
    saved = ops._q_prescaled
    ops._q_prescaled = lambda dtype, scale: False
    try:
        yield
    finally:
        ops._q_prescaled = saved


def part_a():
    B, H, L, D, dtype = 1, 4, 512, 128, torch.bfloat16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)

    def call():
        return attention(q, k, v, bias)

    variants = {  # name: (q scaled in registers, forward config or None for the shipped one)
        "shipped": (True, None),
        "unscaled_64x64_s2": (False, (64, 64, 4, 2, 1, P)),
        "unscaled_64x32_s3": (False, (64, 32, 4, 3, 1, P)),
        "unscaled_64x32_s2": (False, (64, 32, 4, 2, 1, P)),
        "unscaled_128x32_w8_s3": (False, (128, 32, 8, 3, 1, P)),
        "unscaled_128x64_w8_s2": (False, (128, 64, 8, 2, 1, P)),
    }

    def run(name, fn, *args):
        scaled, cfg = variants[name]
        with contextlib.nullcontext() if scaled else q_unscaled():
            return tk.with_configs({"forward_config": cfg} if cfg else {}, fn, *args)

    want = run("shipped", call)
    for name in variants:
        tk.log(kind="check", variant=name, rel_diff=tk.rel(run(name, call), want), **shape)
    for repeat in range(2):
        for name in variants:
            ms, p20, p80, peak = run(name, tk.bench, call, None, "fwd")
            tk.log(kind="time", mode="fwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)
    fn, _ = tk.flex_setup(q, k, v, bias)
    for repeat in range(2):
        ms, p20, p80, peak = tk.bench(fn, None, "fwd")
        tk.log(kind="time", provider="flex", mode="fwd", rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
               **shape)


def part_b():
    B, H, L, D, dtype = 4, 8, 512, 64, torch.float16
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)

    def call():
        return attention(q, k, v, bias)

    def grads():
        return torch.autograd.grad(call(), inputs, dout)

    variants = {"shipped": {}, "dkdv64x128_w8_s3": {"dkdv_config": (64, 128, 8, 3, 1, P)},
                "dkdv64x128_w8_s3_key_major": {"dkdv_config": (64, 128, 8, 3, 1, P, KM)}}
    want = grads()
    for name, configs in variants.items():
        got = tk.with_configs(configs, grads)
        tk.log(kind="check", variant=name, rel_diff=[tk.rel(a, b) for a, b in zip(got, want, strict=True)], **shape)
    for repeat in range(2):
        for name, configs in variants.items():
            ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, "fwd_bwd")
            tk.log(kind="time", mode="fwd_bwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                   **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    part_a()
    torch.cuda.empty_cache()
    part_b()


if __name__ == "__main__":
    main()
