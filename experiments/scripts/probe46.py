"""GPU probe 46: torch.compile(mode="reduce-overhead") at small L, where eager calls are host-bound (probe 45).

Ours eager, ours compiled with mode="reduce-overhead" (fullgraph), and flex compiled with mode="reduce-overhead",
forward (under no_grad) and forward+backward, `do_bench` medians as in probe 45, at B4 H8 L64/128 fp16 and
B1 H4 L128/256 bf16. Ours compiled is compared with ours eager bitwise.

Usage: python experiments/scripts/probe46.py OUT_DIR
"""

import sys

import torch
import torch._dynamo
import triton
import tune_kernels as tk
from probe45 import steps, time_ms
from torch.nn.attention.flex_attention import flex_attention

from flash_tt_attn import attention

SHAPES = [(4, 8, 64, 32, torch.float16), (4, 8, 128, 32, torch.float16),
          (1, 4, 128, 32, torch.bfloat16), (1, 4, 256, 32, torch.bfloat16)]


def measure_shape(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    leaves = tk.make(B, H, L, D, dtype)
    dout = torch.randn_like(leaves[0])
    _, flex_leaves = tk.flex_setup(*leaves)
    qf, kf, vf, bf = flex_leaves

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bf[b // L, h, q_idx, kv_idx]

    flex_ro = torch.compile(flex_attention, dynamic=False, mode="reduce-overhead")
    flex_dout = dout.permute(0, 2, 1, 3, 4).reshape(B * L, H, L, D).contiguous()
    ours_ro = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    for mode in ("fwd", "fwd_bwd"):
        variants = {
            "ours_eager": steps(lambda: attention(*leaves), leaves, dout, mode),
            "ours_reduce_overhead": steps(lambda: ours_ro(*leaves), leaves, dout, mode),
            "flex_reduce_overhead": steps(lambda: flex_ro(qf, kf, vf, score_mod=score_mod), flex_leaves,
                                          flex_dout, mode),
        }
        results = {}
        for name, step in variants.items():
            for _ in range(3):
                results[name] = [t.clone() for t in step()]
            tk.log(kind="time", variant=name, mode=mode, ms=time_ms(step), **shape)
        same = all(torch.equal(a, b) for a, b in zip(results["ours_eager"], results["ours_reduce_overhead"],
                                                        strict=True))
        tk.log(kind="bits", mode=mode, ours_reduce_overhead_equals_eager=same, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 512))
    for shape in SHAPES:
        measure_shape(*shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
