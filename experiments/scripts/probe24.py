"""GPU probe 24: the forward's running row sums on the tensor cores (ops.ROWSUM_BY_PRODUCT). Each key block adds
p·1 (a [BLOCK_K, 16] block of ones) to a [BLOCK_J, 16] accumulator instead of reducing p's rows with adds and
shuffles. Offline (Triton 3.6, sm_90) the D=32 loop goes from 584 to 530 instructions per iteration at 166
registers (168 before), D=64 376 -> 356, D=128 447 -> 426. Forward medians with the switch on and off at the
six targets and at D=64 and 128, twice each in alternation; outputs and lse compared between the two.

Usage: python experiments/scripts/probe24.py OUT_DIR [REPEATS]   (REPEATS: timings of each variant, default 2)
"""

import functools
import sys

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import ops

SHAPES = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
          (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16),
          (4, 8, 512, 64, torch.float16), (1, 4, 512, 128, torch.bfloat16)]


def forward(q, k, v, bias, scale, by_product):
    saved = ops.ROWSUM_BY_PRODUCT
    ops.ROWSUM_BY_PRODUCT = by_product
    try:
        return tk.forward_op(q, k, v, bias, scale)
    finally:
        ops.ROWSUM_BY_PRODUCT = saved


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in SHAPES:
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        scale = D**-0.5
        (o_sum, lse_sum), (o_mma, lse_mma) = (forward(q, k, v, bias, scale, flag) for flag in (False, True))
        tk.log(kind="check", out_rel_diff=tk.rel(o_mma, o_sum), lse_max_abs_diff=(lse_mma - lse_sum).abs().max().item(),
               finite=bool(torch.isfinite(o_mma).all()), **shape)
        for repeat in range(repeats):
            for name, flag in (("rowsum_reduction", False), ("rowsum_by_product", True)):
                ms, p20, p80 = triton.testing.do_bench(functools.partial(forward, q, k, v, bias, scale, flag),
                                                       warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
                tk.log(kind="time", mode="fwd", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
