"""GPU probe 49: the D=32 forward's fixed cost per program, and whether persistent programs recover it.

forward_persistent.py has the question and the kernel. Offline (Triton 3.6, sm_90): the cut-down kernel
needs 168 registers like the library's; persistent without flattening 217 (168 under a cap, no spills);
flattened 248 (232 with 2 stages; 272 bytes of spills under a 168 cap).

A. bits: every variant's output and log-sum-exp against the library forward's (the same arithmetic).
B. do_bench medians at the six targets, every variant, two rounds in alternation.
C. the library forward at B4 H8 fp16 for L = 256 … 1024 (4 … 16 key blocks per program): ns per score, to fit
   t = a + b / blocks.

Usage: python experiments/scripts/probe49.py OUT_DIR
"""

import math

import forward_persistent as fp
import torch
import tune_kernels as tk

SMS = torch.cuda.get_device_properties(0).multi_processor_count
TARGETS = [(4, 8, 256, torch.float16), (4, 8, 512, torch.float16), (4, 8, 768, torch.float16),
           (1, 4, 512, torch.bfloat16), (1, 4, 1024, torch.bfloat16), (1, 4, 2048, torch.bfloat16)]
VARIANTS = {
    "library": lambda q, k, v, b, s: tk.forward_op(q, k, v, b, s),
    "cut_down": lambda q, k, v, b, s: fp.launch(q, k, v, b, s),
    "persistent_3x_cap168": lambda q, k, v, b, s: fp.launch(q, k, v, b, s, programs=3 * SMS, max_registers=168),
    "persistent_2x": lambda q, k, v, b, s: fp.launch(q, k, v, b, s, programs=2 * SMS),
    "flat_2x": lambda q, k, v, b, s: fp.launch(q, k, v, b, s, programs=2 * SMS, flatten=True),
    "flat_2x_2stages": lambda q, k, v, b, s: fp.launch(q, k, v, b, s, programs=2 * SMS, flatten=True,
                                                      num_stages=2),
    "flat_3x_cap168": lambda q, k, v, b, s: fp.launch(q, k, v, b, s, programs=3 * SMS, flatten=True,
                                                     max_registers=168),
}


def inputs(B, H, L, dtype):
    q, k, v, bias = tk.make(B, H, L, 32, dtype, grad=False)
    return q, k, v, bias, 1 / math.sqrt(32)


def part_a():
    for B, H, L, dtype in [(2, 2, 128, torch.float16), (4, 8, 256, torch.float16), (1, 4, 512, torch.bfloat16)]:
        args = inputs(B, H, L, dtype)
        with torch.no_grad():
            ref_out, ref_lse = VARIANTS["library"](*args)
            for name, call in VARIANTS.items():
                out, lse = call(*args)
                torch.cuda.synchronize()
                tk.log(part="A", variant=name, B=B, H=H, L=L, dtype=str(dtype),
                       out_equal=bool(torch.equal(out, ref_out)), lse_equal=bool(torch.equal(lse, ref_lse)),
                       out_max_abs_diff=(out.float() - ref_out.float()).abs().max().item())


def part_b():
    for rnd in range(2):
        for B, H, L, dtype in TARGETS:
            args = inputs(B, H, L, dtype)
            names = list(VARIANTS) if rnd == 0 else list(reversed(VARIANTS))
            for name in names:
                ms, p20, p80, peak = tk.bench(lambda call=VARIANTS[name], a=args: call(*a))
                tk.log(part="B", round=rnd, variant=name, B=B, H=H, L=L, dtype=str(dtype), ms=ms, p20=p20,
                       p80=p80, ns_per_score=ms * 1e6 / (B * H * L**3))
            args = None
            torch.cuda.empty_cache()


def part_c():
    for L in range(256, 1025, 128):
        args = inputs(4, 8, L, torch.float16)
        ms, p20, p80, _ = tk.bench(lambda a=args: VARIANTS["library"](*a))
        tk.log(part="C", variant="library", B=4, H=8, L=L, dtype="torch.float16", blocks=L // 64, ms=ms, p20=p20,
               p80=p80, ns_per_score=ms * 1e6 / (4 * 8 * L**3))
        args = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    tk.log(part="env", sms=SMS, device=torch.cuda.get_device_name(), torch=torch.__version__,
           triton=__import__("triton").__version__)
    part_a()
    part_b()
    part_c()
