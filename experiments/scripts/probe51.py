"""GPU probe 51: v19's forward epilogue (one reciprocal per row, a multiply per element) against v18's
(`acc / l` per element, div.full.f32 with its range fix-ups on each).

Offline (Triton 3.6, sm_90, D=32): the epilogue after the key loop goes from 443 to 363 instructions, the loop
(585) and the 168 registers unchanged; per program 5581 → 5498 instructions at L=512. Prediction, if time follows
instructions: forward −2.6% at B4 H8 L256, −1.5% at L512 and B1 H4 L512, −1.0% at L768, −0.8% at B1 H4 L1024,
−0.4% at L2048; about −1% at D=64 and 128 (the same epilogue); inside one timing's spread except perhaps L256.

Both variants go through the library's forward op: v18's kernel is the library's forward.py with that one line
put back, imported from a copy, and swapped in as ops.attention_fwd_kernel. Three rounds in alternation,
do_bench medians; the outputs compared (lse must be bitwise equal, the output within an ulp of fp16/bf16).

Usage: python experiments/scripts/probe51.py OUT_DIR
"""

import functools
import importlib.util
import os
import sys
import tempfile

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import ops

V19_LINE = "    out = acc * (1.0 / l_safe)[:, None]\n"
V18_LINE = "    out = acc / l_safe[:, None]\n"
SHAPES = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
          (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16),
          (4, 8, 512, 64, torch.float16), (1, 4, 512, 128, torch.bfloat16)]


def v18_kernel(directory):
    """The library's forward kernel with v18's division, imported from a patched copy of forward.py."""
    import flash_tt_attn.kernels.forward as library

    text = open(library.__file__).read()
    if text.count(V19_LINE) != 1:
        raise RuntimeError("forward.py no longer has v19's epilogue line exactly once")
    text = text.replace(V19_LINE, V18_LINE).replace("from .common import", "from flash_tt_attn.kernels.common import")
    path = os.path.join(directory, "forward_v18.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("forward_v18", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention_fwd_kernel


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    kernels = {"v19": ops.attention_fwd_kernel, "v18": v18_kernel(tempfile.mkdtemp())}
    for B, H, L, D, dtype in SHAPES:
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        scale = D ** -0.5
        results = {}
        for name, kernel in kernels.items():
            ops.attention_fwd_kernel = kernel
            results[name] = ops.attention_fwd(q, k, v, bias, None, scale)
        torch.cuda.synchronize()
        (o19, lse19), (o18, lse18) = results["v19"], results["v18"]
        tk.log(kind="bits", lse_equal=bool(torch.equal(lse19, lse18)),
               out_differing_fraction=(o19 != o18).float().mean().item(),
               out_max_abs_diff=(o19.float() - o18.float()).abs().max().item(), **shape)
        results = o19 = o18 = lse19 = lse18 = None
        call = functools.partial(ops.attention_fwd, q, k, v, bias, None, scale)
        for round_ in range(3):
            for name in (("v19", "v18") if round_ % 2 == 0 else ("v18", "v19")):
                ops.attention_fwd_kernel = kernels[name]
                ms = triton.testing.do_bench(call, warmup=25, rep=500, quantiles=[0.5, 0.2, 0.8])
                tk.log(kind="time", variant=name, round=round_, ms=ms, **shape)
        ops.attention_fwd_kernel = kernels["v19"]
        q = k = v = bias = call = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
