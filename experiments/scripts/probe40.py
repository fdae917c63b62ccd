"""GPU probe 40: eager calls through ops.DirectAttention (no custom-op dispatch) against the custom op, as the
benchmark pipeline times them (bench.measure: make_call and time_call, do_bench medians with p20/p80), at the six
issue-5 targets and the two head-dim configurations, forward and forward+backward, the two paths alternated in
two rounds. Also the host's time per call enqueued back to back (50 calls, no synchronize), and whether both
paths give the same bits (output and the four gradients).

Runs against aea8cb7, whose library had ops.DirectAttention and the ops.DIRECT_EAGER_CALLS switch; the next
commit reverted them after this probe (PERF.md, probe 40).

Usage: python experiments/scripts/probe40.py OUT_DIR
"""

import sys
import time

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import ops
from flash_tt_attn.bench.measure import _make_attention, make_call, time_call
from flash_tt_attn.bench.providers import get_provider
from flash_tt_attn.bench.spec import Point

SHAPES = [
    (4, 8, 256, 32, "float16"), (4, 8, 512, 32, "float16"), (4, 8, 768, 32, "float16"),
    (1, 4, 512, 32, "bfloat16"), (1, 4, 1024, 32, "bfloat16"), (1, 4, 2048, 32, "bfloat16"),
    (4, 8, 512, 64, "float16"), (1, 4, 512, 128, "bfloat16"),
]
PATHS = {"direct": True, "op": False}


def host_ms_per_call(call, leaves, n=50):
    """Host time per call with n calls enqueued back to back, and the time until the GPU has run them."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call()
    enqueue = (time.perf_counter() - start) * 1000 / n
    torch.cuda.synchronize()
    return enqueue, (time.perf_counter() - start) * 1000 / n


def same_bits(point, device):
    """Output and gradients from both paths (the pipeline's seeded inputs and dO), compared bitwise."""
    results = {}
    for name, direct in PATHS.items():
        ops.DIRECT_EAGER_CALLS = direct
        fn, leaves, d_out = _make_attention(point, get_provider("attention", "flash_tt_attn"), device)
        out = fn()
        out.backward(d_out)
        results[name] = [out.detach(), *(t.grad for t in leaves)]
    return all(torch.equal(a, b) for a, b in zip(results["direct"], results["op"], strict=True))


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    device = torch.device("cuda")
    for B, H, L, D, dtype in SHAPES:
        shape = dict(B=B, H=H, L=L, D=D, dtype=dtype)
        fwd_bwd = Point("probe40", "attention", "flash_tt_attn", B, H, L, D, dtype, "fwd_bwd")
        tk.log(kind="bits", equal=same_bits(fwd_bwd, device), **shape)
        for mode in ("fwd", "fwd_bwd"):
            point = Point("probe40", "attention", "flash_tt_attn", B, H, L, D, dtype, mode)
            call, leaves = make_call(point, get_provider("attention", "flash_tt_attn"), device)
            for round_ in range(2):
                for name, direct in PATHS.items():
                    ops.DIRECT_EAGER_CALLS = direct
                    call()  # warm-up outside the timings
                    median, p20, p80 = time_call(call, leaves, device, warmup_ms=25, rep_ms=500)
                    enqueue, back_to_back = host_ms_per_call(call, leaves)
                    tk.log(kind="time", path=name, round=round_, mode=mode, median_ms=median, p20_ms=p20,
                           p80_ms=p80, host_enqueue_ms=enqueue, back_to_back_ms=back_to_back, **shape)
            del call, leaves
            torch.cuda.empty_cache()
    ops.DIRECT_EAGER_CALLS = True


if __name__ == "__main__":
    main()
