"""GPU probe 12: forward+backward of the two smallest targets (B=4 H=8 L=256 fp16, B=1 H=4 L=512 bf16)
under probe 11's variants, each timed twice in alternation, with the torch profiler's time per kernel.

Usage: python experiments/scripts/probe_small_shapes.py OUT_DIR
"""

import sys

import torch
import tune_kernels as tk

VARIANTS = {
    "default": {},
    "OLD": tk.OLD_D32,
    "S0_cap128": {"SETTLE_ACCUMULATORS": False, "dkdv_config": tk.OLD_D32["dkdv_config"]},
    "U0": {"DBIAS_UNSCALED_SCORES": False},
}
SHAPES = [(4, 8, 256, 32, torch.float16), (1, 4, 512, 32, torch.bfloat16)]


def probe_shape(B, H, L, D, dtype):
    q, k, v, bias = tk.make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    do = torch.randn_like(q)

    def call():
        return tk.attention(q, k, v, bias)

    for repeat in range(2):
        for name, configs in VARIANTS.items():
            ms, p20, p80, peak = tk.with_configs(configs, tk.bench, call, inputs, "fwd_bwd")
            tk.log(kind="time", provider="flash_tt_attn", mode="fwd_bwd", cfg=name, repeat=repeat, ms=ms,
                   p20=p20, p80=p80, peak_mb=peak, **shape)
    for name, configs in VARIANTS.items():
        tk.log_kernel_profile(name, configs, call, inputs, do, warmup=3, runs=10, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    for shape in SHAPES:
        probe_shape(*shape)


if __name__ == "__main__":
    main()
