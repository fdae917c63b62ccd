"""GPU probe 26: torch.compile'd calls end to end. README's limitations said compiled calls were never timed as a
whole; under torch.compile the dk/dv kernel runs its serialized form (no register cap: probe 19). Forward and
forward+backward medians of `attention` eager and of `torch.compile(attention, fullgraph=True, dynamic=False)`
at the six targets, twice each in alternation, outputs and gradients compared bitwise.

Usage: python experiments/scripts/probe26.py OUT_DIR
"""

import sys

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention

TARGETS = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
           (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16)]


def one_target(B, H, L, D, dtype):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    torch._dynamo.reset()
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    dout = torch.randn_like(q)
    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    calls = {"eager": lambda: attention(q, k, v, bias), "compiled": lambda: compiled(q, k, v, bias)}
    got = {name: tk.output_and_grads(call, inputs, dout) for name, call in calls.items()}
    tk.log(kind="check", bitwise_equal=all(torch.equal(a, b) for a, b in zip(got["eager"], got["compiled"],
                                                                              strict=True)), **shape)
    for mode in ("fwd", "fwd_bwd"):
        for repeat in range(2):
            for name, call in calls.items():
                ms, p20, p80, peak = tk.bench(call, inputs, mode)
                tk.log(kind="time", mode=mode, variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, peak_mb=peak,
                       **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for target in TARGETS:
        one_target(*target)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
