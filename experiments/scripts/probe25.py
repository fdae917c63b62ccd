"""GPU probe 25, probe 24 again with the right baseline. Probe 24's switch-off variant was not the shipped forward:
at 65968df the kernel loaded v before the row sum, which took the D=32 forward from 168 registers to 170 (fp16)
and 172 (bf16), two programs per SM instead of three. Now the switch off compiles to the shipped kernel (offline,
Triton 3.6, sm_90: 168 registers, 584 instructions per iteration in fp16, 600 in bf16). The row sums by product:
fp16 166 registers and 530 instructions; bf16 172 and 546, or 168 and 547 under a 168-register cap. Forward
medians of the three (off, on, on with the cap) at the six targets, and off/on at D=64 and 128, each timed
REPEATS times in alternation; outputs and lse compared with the switch-off forward's.

Usage: python experiments/scripts/probe25.py OUT_DIR [REPEATS]   (REPEATS: timings of each variant, default 3)
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import ops

SHAPES = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
          (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16),
          (4, 8, 512, 64, torch.float16), (1, 4, 512, 128, torch.bfloat16)]


def forward(q, k, v, bias, scale, by_product, max_registers):
    saved = ops.ROWSUM_BY_PRODUCT
    ops.ROWSUM_BY_PRODUCT = by_product
    shipped = ops.forward_config(q.shape[3], q.shape[4], q.dtype, q.device)
    cfg = dataclasses.astuple(dataclasses.replace(shipped, max_registers=max_registers))
    try:
        return tk.with_configs({"forward_config": cfg}, tk.forward_op, q, k, v, bias, scale)
    finally:
        ops.ROWSUM_BY_PRODUCT = saved


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in SHAPES:
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        scale = D**-0.5
        variants = {"rowsum_reduction": (False, None), "rowsum_by_product": (True, None)}
        if D == 32:
            variants["rowsum_by_product_r168"] = (True, 168)
        o_sum, lse_sum = forward(q, k, v, bias, scale, False, None)
        for name, args in variants.items():
            o, lse = forward(q, k, v, bias, scale, *args)
            tk.log(kind="check", variant=name, out_rel_diff=tk.rel(o, o_sum),
                   lse_max_abs_diff=(lse - lse_sum).abs().max().item(), finite=bool(torch.isfinite(o).all()), **shape)
        for repeat in range(repeats):
            for name, args in variants.items():
                ms, p20, p80 = triton.testing.do_bench(functools.partial(forward, q, k, v, bias, scale, *args),
                                                       warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
                tk.log(kind="time", mode="fwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
