"""GPU probe 36: what the forward's running max costs at D=32, by ablation.

The forward's loop spends per iteration (offline, Triton 3.6, sm_90: 584 instructions) 72 FMNMX, 16 SHFL and
~36 FMUL on the running max and the rescale of the accumulator and the sum, plus 32 HADD2 and ~30 MOV turning
the fp16 bias tile into two fp32 accumulators. A variant of the forward kernel with a SHIFT_MODE switch:

* 0: the shipped online softmax;
* 1: a fixed shift per query (here the true base-2 log-sum-exp of a previous call, so the output is exact):
  no max, no rescale, the row sum kept. This is what an upper bound of the scores given in advance (for
  instance max_k bias + scale·|q|·max_k |k|) would cost;
* 2: the fixed shift and no sum either (timing only for what the sum costs).

mode 1 also capped at 168 registers. Also the gap, in base-2 units,
between the Cauchy-Schwarz bound above and the true log-sum-exp on the probe's random inputs: how far fp16 P
would sit below 1 if that bound were the shift.

Usage: python experiments/scripts/probe36.py OUT_DIR
"""

import functools
import importlib.util
import os

import torch
import tune_kernels as tk
from triton import language as tl

from flash_tt_attn.reference import attention_reference

UPDATE_OLD = """    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no admitted key so far keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) * 1.4426950408889634
    p = exp2(s * 1.4426950408889634 - m_shift[:, None], FAST_EXP2)
    alpha = exp2(m_i * 1.4426950408889634 - m_shift, FAST_EXP2)
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOAD_MASKED:
        v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
    else:
        v_tile = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION,
                                        out_dtype=ACC_DTYPE)
    return m_new, l_i, acc"""
UPDATE_NEW = """    if LOAD_MASKED:
        v_tile = tl.load(v_ptrs, mask=k_in[:, None], other=0.0)
    else:
        v_tile = tl.load(v_ptrs)
    if SHIFT_MODE == 0:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) * 1.4426950408889634
        p = exp2(s * 1.4426950408889634 - m_shift[:, None], FAST_EXP2)
        alpha = exp2(m_i * 1.4426950408889634 - m_shift, FAST_EXP2)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION,
                                            out_dtype=ACC_DTYPE)
    else:
        m_new = m_i
        p = exp2(s * 1.4426950408889634 - (m_i * 1.4426950408889634)[:, None], FAST_EXP2)
        if SHIFT_MODE == 1:
            l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v_tile.dtype), v_tile, acc=acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return m_new, l_i, acc"""
INIT_NEW = """    if SHIFT_MODE > 0:
        shift_base = SHIFT + b * stride_lb + h * stride_lh + offs_j.to(tl.int64) * stride_lj
        m0 = tl.load(shift_base + row0 * stride_li) / 1.4426950408889634
        m1 = tl.load(shift_base + (row0 + 1) * stride_li) / 1.4426950408889634
        if SHIFT_MODE == 2:
            l0 = l0 + 1.0
            l1 = l1 + 1.0

    for k_start in tl.range("""
EDITS = [
    ("from .common import exp2, prescale, scores", "from flash_tt_attn.kernels.common import exp2, prescale, scores"),
    ("DOT_PRECISION: tl.constexpr, FAST_EXP2: tl.constexpr):",
     "DOT_PRECISION: tl.constexpr, FAST_EXP2: tl.constexpr, SHIFT_MODE: tl.constexpr = 0):"),
    (UPDATE_OLD, UPDATE_NEW),
    ("    Q, K, V, BIAS, MASK, OUT, LSE,\n", "    Q, K, V, BIAS, MASK, OUT, LSE, SHIFT,\n"),
    ("    ROW_OFFSET_DTYPE: tl.constexpr,\n):",
     "    ROW_OFFSET_DTYPE: tl.constexpr,\n    SHIFT_MODE: tl.constexpr = 0,\n):"),
    ("\n    for k_start in tl.range(", "\n" + INIT_NEW),
    ("not EVEN_L, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)",
     "not EVEN_L, ACC_DTYPE, DOT_PRECISION, FAST_EXP2, SHIFT_MODE)"),
    ("kin1, True, ACC_DTYPE, DOT_PRECISION, FAST_EXP2)",
     "kin1, True, ACC_DTYPE, DOT_PRECISION, FAST_EXP2, SHIFT_MODE)"),
]


def shift_forward_module(directory):
    """Write the variant kernel to directory/forward_shift.py and import it."""
    import flash_tt_attn.kernels.forward as base
    text = open(base.__file__).read()
    for old, new in EDITS:
        if text.count(old) != 1:
            raise RuntimeError(f"forward.py has changed since probe 36: {old[:60]!r} is not there exactly once")
        text = text.replace(old, new)
    path = os.path.join(directory, "forward_shift.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("forward_shift", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (SHIFT_MODE, register cap). Offline: mode 0 168 registers, 584 instructions per iteration; mode 1
# 176 (two programs per SM instead of three unless capped), 447; mode 2 168, 377. The bias in fp32 saves 12
# instructions (its conversions become shared-memory loads) and costs 4 registers: not timed.
VARIANTS = {"base": (0, None), "fixed_shift": (1, None), "fixed_shift_r168": (1, 168), "fixed_shift_no_sum": (2, None)}


def forward(kernels, q, k, v, bias, shift, scale, mode, maxnreg):
    """The variant kernel launched as the library launches its forward at D = 32 (two rows, 64×64 tiles)."""
    B, H, R, L, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, R, L), dtype=torch.float32, device=q.device)
    grid = (L // 64, tk.triton.cdiv(R, 2), B * H)
    kernels.attention_fwd_kernel[grid](
        q, k, v, bias, q, out, lse, shift, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias.stride(),
        0, 0, 0, *lse.stride(), H, R, L, scale, HAS_MASK=False, EVEN_L=True, Q_PRESCALED=True, ROWS=2, BLOCK_J=64,
        BLOCK_K=64, HEAD_DIM=D, ACC_DTYPE=tl.float32, DOT_PRECISION="tf32", FAST_EXP2=True, LOOP_STAGES=3,
        ROW_OFFSET_DTYPE=tl.int32, SHIFT_MODE=mode, num_warps=4, num_stages=3,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out, lse


def bound_gap(q, k, bias, scale, lse):
    """Quantiles of (Cauchy-Schwarz bound of the scores)·log2(e) - lse over every (b, h, i, j)."""
    qn = q.float().norm(dim=-1)  # (B, H, R, L)
    kmax = k.float().norm(dim=-1).amax(dim=-1, keepdim=True)  # (B, H, R, 1)
    bmax = bias.float().amax(dim=-1)[:, :, None, :]  # (B, H, 1, L)
    bound = (bmax + scale * qn * kmax) * 1.4426950408889634
    gap = (bound - lse).flatten()
    return {f"q{int(p * 100)}": torch.quantile(gap[:2**23], p).item() for p in (0.0, 0.5, 0.9, 0.99, 1.0)}


def registers(kernels):
    found = []
    for cache in kernels.attention_fwd_kernel.device_caches.values():
        for compiled in cache[0].values():
            found.append((getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)))
    return found


def main():
    kernels = shift_forward_module(tk.OUT)
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=tk.triton.__version__)
    for L, dtype in [(128, torch.float16), (192, torch.bfloat16)]:
        q, k, v, bias = tk.make(1, 2, L, 32, dtype, grad=False)
        scale = 32**-0.5
        ref = attention_reference(q.double(), k.double(), v.double(), bias.double(), scale)
        shipped, shipped_lse = tk.forward_op(q, k, v, bias, scale)
        for name, (mode, maxnreg) in VARIANTS.items():
            out, _ = forward(kernels, q, k, v, bias, shipped_lse, scale, mode, maxnreg)
            tk.log(kind="check", variant=name, L=L, D=32, dtype=str(dtype), err_vs_fp64=tk.rel(out, ref),
                   shipped_err_vs_fp64=tk.rel(shipped, ref),
                   max_abs_vs_fp64=(out.double() - ref).abs().max().item(),
                   shipped_max_abs=(shipped.double() - ref).abs().max().item())
    for B, H, L, dtype in [(4, 8, 512, torch.float16), (4, 8, 256, torch.float16), (1, 4, 1024, torch.bfloat16)]:
        q, k, v, bias = tk.make(B, H, L, 32, dtype, grad=False)
        scale = 32**-0.5
        shape = dict(B=B, H=H, L=L, D=32, dtype=str(dtype))
        _, shift = tk.forward_op(q, k, v, bias, scale)
        tk.log(kind="bound_gap", **shape, **bound_gap(q, k, bias, scale, shift))
        for repeat in range(2):
            ms, p20, p80, _ = tk.bench(functools.partial(tk.forward_op, q, k, v, bias, scale))
            tk.log(kind="time", variant="ops", rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
            for name, (mode, maxnreg) in VARIANTS.items():
                call = functools.partial(forward, kernels, q, k, v, bias, shift, scale, mode, maxnreg)
                ms, p20, p80, _ = tk.bench(call)
                tk.log(kind="time", variant=name, rep=repeat, ms=ms, p20=p20, p80=p80, **shape)
        tk.log(kind="registers", found=registers(kernels))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
