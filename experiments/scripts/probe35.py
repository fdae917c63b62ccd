"""GPU probe 35: dq folded into the dk/dv pass (kernels/backward_fused.py, ``ops.FUSED_DQ``).

The backward now runs dq (3 products, 1 exponential per score) and dk/dv (4 products, 1 exponential) as two
kernels. The fused kernel runs 5 products and 1 exponential per score and adds each step's ds·k into an fp32
dq strip that one persistent program owns (8 bytes of L2 traffic per 64x32 dq tile element and key block).
Offline (Triton 3.6, sm_90, D=32 64x64 tiles, 4 warps, 3 stages): 254 registers without a cap (two programs
per SM), 168 with 196 bytes of spills under a cap of 168 (three per SM).

For each target shape: the whole backward op (the custom op, its forward done once), shipped against fused
variants, alternated over two rounds (medians of do_bench, ms); gradients of each fused variant against the
shipped ones (max abs difference over max abs), and the fused gradients of two calls compared bitwise. At one
small shape every variant's gradients are compared with the fp64 reference.

Ran at 8b9fee9, whose library has the fused kernel and ops' switches; they were removed after this probe
(PERF.md: rejected), so check out that commit to run it again.

Usage: python experiments/scripts/probe35.py OUT_DIR
"""

import sys

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import ops

VARIANTS = {  # name -> (FUSED_DQ, FUSED_SLOTS_PER_SM, FUSED_MAX_REGISTERS)
    "shipped": (False, 2, None),
    "fused_2slots": (True, 2, None),
    "fused_4slots": (True, 4, None),
    "fused_3slots_cap168": (True, 3, 168),
}
TARGETS = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
           (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16)]


def use(name):
    ops.FUSED_DQ, ops.FUSED_SLOTS_PER_SM, ops.FUSED_MAX_REGISTERS = VARIANTS[name]


def fused_registers():
    """(registers, spill bytes) of every compiled variant of the fused kernel, as Triton reports them."""
    found = []
    try:
        for cache in ops.attention_bwd_dkdvdq_kernel.device_caches.values():
            for compiled in cache[0].values():
                found.append((getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)))
    except (AttributeError, TypeError, IndexError) as error:
        found.append(repr(error))
    return found


def backward_call(B, H, L, D, dtype):
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D ** -0.5
    out, lse = tk.forward_op(q, k, v, bias, scale)
    dout = torch.randn_like(out)
    return lambda: torch.ops.flash_tt_attn.attention_bwd(dout, q, k, v, bias, None, out, lse, scale)


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_against_fp64():
    B, H, L, D, dtype = 1, 2, 128, 32, torch.float16
    inputs = tk.make(B, H, L, D, dtype)
    dout = torch.randn(B, H, L, L, D, device="cuda", dtype=dtype)
    ref = tk.fp64_reference(inputs, dout)
    from flash_tt_attn import attention
    for name in VARIANTS:
        use(name)
        got = tk.output_and_grads(lambda: attention(*inputs), inputs, dout)
        tk.log(kind="fp64_check", variant=name, shape=[B, H, L, D], dtype=str(dtype),
               rel_err=[tk.rel(g, r) for g, r in zip(got, ref, strict=True)])


def one_target(B, H, L, D, dtype):
    call = backward_call(B, H, L, D, dtype)
    use("shipped")
    shipped = call()
    for name in VARIANTS:
        if name == "shipped":
            continue
        use(name)
        first, second = call(), call()
        tk.log(kind="agreement", variant=name, shape=[B, H, L, D], dtype=str(dtype),
               max_rel_vs_shipped=[max_rel(a, b) for a, b in zip(first, shipped, strict=True)],
               bitwise_repeat=all(torch.equal(a, b) for a, b in zip(first, second, strict=True)))
    for round_ in range(2):
        for name in VARIANTS:
            use(name)
            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms, p20, p80 = triton.testing.do_bench(call, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            tk.log(kind="bwd_time", variant=name, round=round_, shape=[B, H, L, D], dtype=str(dtype),
                   ms=ms, p20=p20, p80=p80, peak_mb=peak)
    del shipped


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    check_against_fp64()
    for target in TARGETS:
        one_target(*target)
        tk.log(kind="registers", fused=fused_registers())
    use("shipped")


if __name__ == "__main__":
    main()
