"""GPU probe 15: forward tile configs with more resident programs (64-key blocks → 32) at D = 32 and D = 128,
each checked against fp64 and timed twice, alternating with the shipped config, in one process.

Usage: python experiments/scripts/probe15.py OUT_DIR
"""

import functools

import torch
import tune_kernels as tk

from flash_tt_attn.reference import attention_reference

# LaunchConfig fields: block_j, block_k, num_warps, num_stages, rows, pipeline_all_loads, key_major_bias,
# max_registers; None is the shipped chooser.
VARIANTS = {
    32: {"default": None, "k32_s3": (64, 32, 4, 3, 2, True), "k32_s4_r128": (64, 32, 4, 4, 2, True, False, 128),
         "k32_s2": (64, 32, 4, 2, 2, True)},
    128: {"default": None, "k32_s2": (64, 32, 4, 2, 1, True), "k32_s2_r168": (64, 32, 4, 2, 1, True, False, 168),
          "k32_s3_r168": (64, 32, 4, 3, 1, True, False, 168), "k64_s3": (64, 64, 4, 3, 1, True)},
}


def configs(cfg):
    """tune_kernels.with_configs' argument: the forward's chooser fixed to cfg, or left alone (None)."""
    return {} if cfg is None else {"forward_config": cfg}


def main():
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=tk.triton.__version__)
    for D, L, dtype in [(32, 192, torch.float16), (32, 96, torch.bfloat16), (128, 192, torch.bfloat16),
                        (128, 128, torch.float16)]:
        q, k, v, bias = tk.make(1, 2, L, D, dtype, grad=False)
        scale = D**-0.5
        ref = attention_reference(q.double(), k.double(), v.double(), bias.double(), scale)
        for name, cfg in VARIANTS[D].items():
            out, _ = tk.with_configs(configs(cfg), tk.forward_op, q, k, v, bias, scale)
            tk.log(kind="check", variant=name, L=L, D=D, dtype=str(dtype), err_vs_fp64=tk.rel(out, ref))
    for B, H, L, D, dtype in [(4, 8, 512, 32, torch.float16), (4, 8, 256, 32, torch.float16),
                              (1, 4, 1024, 32, torch.bfloat16), (1, 4, 512, 128, torch.bfloat16)]:
        q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
        scale = D**-0.5
        for repeat in range(2):
            for name, cfg in VARIANTS[D].items():
                ms, p20, p80, _ = tk.with_configs(configs(cfg), tk.bench,
                                                  functools.partial(tk.forward_op, q, k, v, bias, scale))
                tk.log(kind="time", variant=name, rep=repeat, B=B, H=H, L=L, D=D, dtype=str(dtype), ms=ms, p20=p20,
                       p80=p80)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
