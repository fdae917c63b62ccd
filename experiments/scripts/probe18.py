"""GPU probe 18: was probe 17's dk/dv comparison fair? Outside a triton_op, torch's wrap_triton is enabled
(as while torch.compile traces), so ops._launch_options dropped the library kernel's 168-register cap
there, and probe 17 timed the library's dk/dv uncapped against a capped descriptor variant. This times
both launches inside set_wrap_triton_enabled(False), as attention_bwd runs them in eager mode: the pointer
kernel (the shipped config with descriptor loads switched off) and the descriptor kernel (shipped config),
plus the pointer kernel without its cap (probe 17's accidental setting). Twice each, alternating.

It ran at 6bfbff1, whose library had the descriptor kernel (5ec14a4, reverted in 94a836e after this
probe found it no faster): it needs that commit's ops.dkdv_descriptor_loads and LaunchConfig.descriptor_loads.

Usage (at 6bfbff1): python experiments/scripts/probe18.py OUT_DIR
"""

import dataclasses
import functools
import sys

import torch
import triton
import tune_kernels as tk
from dq_tma import dq_library
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import ops


def dkdv_with(cfg, args):
    """The library's dk/dv launch with dkdv_config fixed to cfg, as inside attention_bwd in eager mode."""
    saved = ops.dkdv_config
    ops.dkdv_config = lambda *a: cfg
    try:
        with set_wrap_triton_enabled(False):
            q, k, v, bias, lse, delta, dout, scale = args
            common = dict(HAS_MASK=False, Q_PRESCALED=True, HEAD_DIM=q.shape[-1], ACC_DTYPE=ops._acc_dtype(q.dtype),
                          DOT_PRECISION="tf32", FAST_EXP2=True)
            return ops._launch_dkdv(dout, q, k, v, bias, ops._mask_args(None, q), lse, delta, scale, common)
    finally:
        ops.dkdv_config = saved


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for B, H, L, D, dtype in [(4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16),
                              (4, 8, 256, 32, torch.float16)]:
        shipped = ops.dkdv_config(L, D, dtype, torch.device("cuda"))
        variants = {"pointers_r168": dataclasses.replace(shipped, descriptor_loads=False),
                    "descriptors_r168": shipped,
                    "pointers_uncapped": dataclasses.replace(shipped, descriptor_loads=False, max_registers=None)}
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        dout = torch.randn_like(q)
        scale = D**-0.5
        out, lse = tk.forward_op(q, k, v, bias, scale)
        _, delta = dq_library(q, k, v, bias, out, lse, dout, scale)
        args = (q, k, v, bias, lse, delta, dout, scale)
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        want = dkdv_with(variants["pointers_r168"], args)
        for name, cfg in variants.items():
            got = dkdv_with(cfg, args)
            with set_wrap_triton_enabled(False):
                descriptors = ops.dkdv_descriptor_loads(q, dout, cfg)
            tk.log(kind="check", variant=name, uses_descriptors=descriptors,
                   bitwise_equal=all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), **shape)
        for repeat in range(2):
            for name, cfg in variants.items():
                ms, p20, p80 = triton.testing.do_bench(functools.partial(dkdv_with, cfg, args), warmup=50,
                                                       rep=300, quantiles=[0.5, 0.2, 0.8])
                tk.log(kind="time", kernel="dkdv", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
