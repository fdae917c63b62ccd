"""GPU probe 13: the forward written in Gluon (`forward_gluon.py`: explicit asynchronous wgmma, the two rows'
softmaxes staggered against each other's products) against the Triton forward, checked against fp64 and timed
twice at the D = 32 targets.

Usage: python experiments/scripts/probe13.py OUT_DIR
"""

import functools

import forward_gluon
import torch
import tune_kernels as tk

from flash_tt_attn.reference import attention_reference

VARIANTS = {"g_ns3": {}, "g_ns3_r168": {"maxnreg": 168}, "g_ns4_pf2": {"num_stages": 4, "prefetch": 2}}
CHECKS = [(1, 2, 64, 64, 32, torch.float16), (2, 3, 7, 128, 32, torch.bfloat16), (1, 2, 64, 192, 64, torch.float16),
          (1, 2, 16, 256, 32, torch.float16)]
TIMED = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (4, 8, 768, 32, torch.float16),
         (1, 4, 512, 32, torch.bfloat16), (1, 4, 1024, 32, torch.bfloat16), (1, 4, 2048, 32, torch.bfloat16),
         (1, 4, 512, 64, torch.bfloat16)]


def check(B, H, R, L, D, dtype):
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    q, k, v = (t[:, :, :R].contiguous() for t in (q, k, v))  # R rows i of L
    scale = D**-0.5
    ref = attention_reference(q.double(), k.double(), v.double(), bias.double(), scale)
    out, lse = tk.forward_op(q, k, v, bias, scale)
    for name, options in VARIANTS.items():
        g_out, g_lse = forward_gluon.launch(q, k, v, bias, scale, **options)
        tk.log(kind="check", variant=name, B=B, H=H, R=R, L=L, D=D, dtype=str(dtype), err_vs_fp64=tk.rel(g_out, ref),
               triton_err_vs_fp64=tk.rel(out, ref), lse_diff=(g_lse - lse).abs().max().item(),
               nan=bool(g_out.isnan().any()))


def time_shape(B, H, L, D, dtype):
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D**-0.5
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    for repeat in range(2):
        ms, p20, p80, _ = tk.bench(functools.partial(tk.forward_op, q, k, v, bias, scale))
        tk.log(kind="time", variant="triton", rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        for name, options in VARIANTS.items():
            if D == 64 and name != "g_ns3":
                continue
            ms, p20, p80, _ = tk.bench(functools.partial(forward_gluon.launch, q, k, v, bias, scale, **options))
            tk.log(kind="time", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)


def main():
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=tk.triton.__version__)
    for shape in CHECKS:
        check(*shape)
    for shape in TIMED:
        time_shape(*shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
