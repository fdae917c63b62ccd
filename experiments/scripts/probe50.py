"""GPU probe 50: the bias gradient folded into dk/dv with per-row-group atomic sums (dkdv_dbias.py).

Prediction. At D=128 (B1 H4 L512 bf16) the library's backward is dq 1.13 + dk/dv 1.35 + bias gradient 1.02 ms;
the fused pass drops the last kernel and adds 0.54 G fp32 atomic adds (2.1 GB, 16-byte vector REDs) to dk/dv,
whose loop offline also spills 16 two-byte values per iteration (255 registers, 48 bytes of stack). If the L2
absorbs the REDs at 4–6 TB/s the backward loses 0.3–0.6 ms (forward+backward 4.45 → ~3.9–4.1 ms, flex 3.99); at
D=64 less (the bias gradient reads 6 bytes per score there); at D=32 a loss (4.3 G REDs at L=512, 17 GB, more
than the bias kernel's 2.2 ms).

A. small shapes: dk and dv against the library's (bitwise), dbias against the library's and against the fp64
   reference (relative error of each), and the fused pass run twice (bitwise).
B. the backward alone, library against fused at several split counts, two alternated rounds of do_bench
   (medians, p20, p80) with peak memory; the fused dbias run twice (bitwise) and against the library's.

Usage: python experiments/scripts/probe50.py OUT_DIR
"""

import sys

import dkdv_dbias as dd
import torch
import triton
import tune_kernels as tk
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import ops

SHAPES = [  # B, H, L, D, dtype, split counts
    (1, 4, 512, 128, torch.bfloat16, (8, 16, 32)), (1, 4, 1024, 128, torch.bfloat16, (4, 8, 16)),
    (4, 8, 512, 64, torch.float16, (2, 4, 8)), (4, 8, 256, 32, torch.float16, (2, 4)),
    (4, 8, 512, 32, torch.float16, (2, 4)), (1, 4, 1024, 32, torch.bfloat16, (4, 8)),
]
SMALL = [(1, 2, 128, 128, torch.bfloat16), (1, 2, 128, 64, torch.float16), (1, 2, 128, 32, torch.float16)]


def backward_fused(dout, q, k, v, bias, out, lse, scale, splits):
    """dq from the library's launcher (it writes delta), then dk, dv and dbias from the fused pass."""
    with set_wrap_triton_enabled(False):
        delta = torch.empty_like(lse)
        mask_args = ops._mask_args(None, q)
        common = ops.backward_constants(q, mask_args, scale)
        dq = ops._launch_dq(dout, q, k, v, bias, mask_args, out, lse, delta, scale, common)
        dk, dv, dbias = dd.dkdv_dbias(q, k, v, bias, lse, delta, dout, scale, splits)
    return dq, dk, dv, dbias


def setup(B, H, L, D, dtype):
    q, k, v, bias = tk.make(B, H, L, D, dtype, grad=False)
    scale = D ** -0.5
    out, lse = ops.attention_fwd(q, k, v, bias, None, scale)
    return q, k, v, bias, out, lse, torch.randn_like(q), scale


def part_a():
    for B, H, L, D, dtype in SMALL:
        q, k, v, bias, out, lse, dout, scale = setup(B, H, L, D, dtype)
        lib = ops.attention_bwd(dout, q, k, v, bias, None, out, lse, scale)
        ref = tk.fp64_reference((q, k, v, bias), dout)[1:]
        for splits in (1, 2, 4):
            fused = backward_fused(dout, q, k, v, bias, out, lse, scale, splits)
            again = backward_fused(dout, q, k, v, bias, out, lse, scale, splits)
            torch.cuda.synchronize()
            tk.log(part="A", B=B, H=H, L=L, D=D, dtype=str(dtype), splits=splits,
                   dq_dk_dv_equal_library=all(torch.equal(a, b) for a, b in zip(lib[:3], fused[:3], strict=True)),
                   repeat_equal=all(torch.equal(a, b) for a, b in zip(fused, again, strict=True)),
                   dbias_rel_err_library=tk.rel(lib[3], ref[3]), dbias_rel_err_fused=tk.rel(fused[3], ref[3]),
                   dbias_rel_diff=tk.rel(fused[3], lib[3]))


def measure_shape(B, H, L, D, dtype, split_counts):
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
    q, k, v, bias, out, lse, dout, scale = setup(B, H, L, D, dtype)
    variants = {"library": lambda: ops.attention_bwd(dout, q, k, v, bias, None, out, lse, scale)}
    for s in split_counts:
        variants[f"fused_{s}"] = lambda s=s: backward_fused(dout, q, k, v, bias, out, lse, scale, s)
    lib_dbias = variants["library"]()[3]
    for name, call in variants.items():
        if name != "library":
            first, second = call()[3], call()[3]
            tk.log(part="B", kind="bits", variant=name, repeat_equal=bool(torch.equal(first, second)),
                   dbias_rel_diff=tk.rel(first, lib_dbias), **shape)
    for round_ in range(2):
        for name, call in (variants.items() if round_ == 0 else reversed(variants.items())):
            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(call, warmup=25, rep=500, quantiles=[0.5, 0.2, 0.8])
            tk.log(part="B", kind="time", variant=name, round=round_, ms=ms, peak_mb=peak_mb, **shape)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    part_a()
    for shape in SHAPES:
        measure_shape(*shape)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
