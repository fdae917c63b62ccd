"""GPU probe 30, after v16: torch.compile'd calls at D=64 and 128. v16's dq at D=128 (128x32, 8 warps) is capped
at 128 registers; a traced launch cannot carry the cap (ops._launch_options) and runs it with its accumulator
left in flight (ops._settle): offline 147 registers, one program of 8 warps per SM instead of two. Forward and
forward+backward medians of `attention` eager and of `torch.compile(attention, fullgraph=True, dynamic=False)`,
twice each, outputs and gradients compared bitwise with eager; at D=128 also a compiled call whose dq runs on
64x32 tiles with q unscaled (155 registers uncapped, three programs of 4 warps; the same key blocks as v16's
dq, so possibly the same bits), the candidate config for traced launches.

Usage: python experiments/scripts/probe30.py OUT_DIR
"""

import dataclasses
import sys

import torch
import triton
import tune_kernels as tk
from probe27 import cfg

from flash_tt_attn import attention

TRACED_DQ_128 = {"dq_config": dataclasses.astuple(cfg(64, 32, 4, 2))}


def one_target(B, H, L, D, dtype, compiled_variants):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)

    def eager():
        return attention(q, k, v, bias)
    want = tk.output_and_grads(eager, inputs, dout)
    for name, configs in compiled_variants.items():
        torch._dynamo.reset()
        compiled = torch.compile(attention, fullgraph=True, dynamic=False)

        def call(compiled=compiled, configs=configs):
            return tk.with_configs(configs, compiled, q, k, v, bias)
        got = tk.output_and_grads(call, inputs, dout)
        tk.log(kind="check", variant=name, bitwise_equal=[torch.equal(a, b) for a, b in zip(got, want, strict=True)],
               rel_diff=[tk.rel(a, b) for a, b in zip(got, want, strict=True)], **shape)
        for mode in ("fwd", "fwd_bwd"):
            for repeat in range(2):
                for variant, fn in (("eager", eager), (name, call)):
                    ms, p20, p80, peak = tk.bench(fn, inputs, mode)
                    tk.log(kind="time", mode=mode, variant=variant, rep=repeat, ms=ms, p20=p20, p80=p80,
                           peak_mb=peak, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    one_target(1, 4, 512, 128, torch.bfloat16, {"compiled": {}, "compiled_dq64x32": TRACED_DQ_128})
    torch.cuda.empty_cache()
    one_target(4, 8, 512, 64, torch.float16, {"compiled": {}})


if __name__ == "__main__":
    main()
