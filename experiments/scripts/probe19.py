"""GPU probe 19: which dk/dv kernel should a torch.compile'd call run? A traced launch cannot carry Triton's
maxnreg (torch's wrap_triton drops it, and Inductor's user-kernel configs keep only num_warps and
num_stages), so compiled graphs run the shipped dk/dv (settled accumulators, 168-register cap) uncapped:
175 registers, two programs per SM. Its serialized form (LaunchConfig.settle=False) needs 148 registers
uncapped, three programs per SM. Timed as attention_bwd launches dk/dv in eager mode (wrap_triton off),
each config twice, alternating; the gradients are compared bitwise.

Usage: python experiments/scripts/probe19.py OUT_DIR
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk
from dkdv_tma import dkdv_library
from dq_tma import dq_library

from flash_tt_attn import ops


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in [(4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16),
                              (4, 8, 256, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16)]:
        shipped = ops.dkdv_config(L, D, dtype, torch.device("cuda"))
        variants = {"settled_r168": shipped,
                    "settled_uncapped": dataclasses.replace(shipped, max_registers=None),
                    "serial_uncapped": dataclasses.replace(shipped, max_registers=None, settle=False),
                    "serial_r128": dataclasses.replace(shipped, max_registers=128, settle=False)}
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        dout = torch.randn_like(q)
        scale = D**-0.5
        out, lse = tk.forward_op(q, k, v, bias, scale)
        _, delta = dq_library(q, k, v, bias, out, lse, dout, scale)
        args = (q, k, v, bias, lse, delta, dout, scale)
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))

        def run(cfg, args=args):
            return tk.with_configs({"dkdv_config": dataclasses.astuple(cfg)}, dkdv_library, *args)
        want = run(shipped)
        for name, cfg in variants.items():
            got = run(cfg)
            tk.log(kind="check", variant=name, bitwise_equal=all(torch.equal(a, b) for a, b in
                                                                 zip(got, want, strict=True)), **shape)
        for repeat in range(2):
            for name, cfg in variants.items():
                ms, p20, p80 = triton.testing.do_bench(functools.partial(run, cfg), warmup=50, rep=300,
                                                       quantiles=[0.5, 0.2, 0.8])
                tk.log(kind="time", kernel="dkdv", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
