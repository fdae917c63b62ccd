"""GPU probe for kernel development: correctness of each launch config, then timings
against FlexAttention, in one process (one device call). Not part of the published
pipeline (that is `python -m flash_tt_attn.bench`); its raw output goes to PERF.md.

Usage: python experiments/scripts/tune_kernels.py OUT_DIR [--quick]
"""

import json
import sys
import time

import torch
import triton

from flash_tt_attn import attention, ops
from flash_tt_attn.reference import attention_chunked

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
QUICK = "--quick" in sys.argv
rows = []


def log(**row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(f"{OUT}/tune.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def fixed(values):
    """A config chooser that always returns LaunchConfig(*values)."""
    cfg = ops.LaunchConfig(*values)
    return lambda *args: cfg


def make(B, H, L, D, dtype, grad=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    bias = torch.randn(B, H, L, L, device="cuda", dtype=dtype, generator=g)
    ts = [q, k, v, bias]
    if grad:
        for t in ts:
            t.requires_grad_(True)
    return ts


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(B, H, L, D, dtype, masked):
    q, k, v, bias = make(B, H, L, D, dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L, L, device="cuda") > 0.2
        mask[0, 0] = False
    do = torch.randn_like(q)
    o = attention(q, k, v, bias, None, mask=mask)
    grads = torch.autograd.grad(o, (q, k, v, bias), do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ro = attention_chunked(*ref_in, scale=None, mask=mask, chunk_rows=8)
    rgrads = torch.autograd.grad(ro, ref_in, do.double())
    errs = [rel(o, ro)] + [rel(a, b) for a, b in zip(grads, rgrads, strict=True)]
    nan = bool(torch.isnan(o).any() or any(torch.isnan(x).any() for x in grads))
    return errs, nan


def flex_setup(q, k, v, bias):
    from torch.nn.attention.flex_attention import flex_attention

    B, H, L, _, D = q.shape
    def fold(t):
        return t.detach().permute(0, 2, 1, 3, 4).reshape(B * L, H, L, D).contiguous().requires_grad_()

    qf, kf, vf = fold(q), fold(k), fold(v)
    bf = bias.detach().clone().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bf[b // L, h, q_idx, kv_idx]

    fn = torch.compile(flex_attention, dynamic=False)
    return (lambda: fn(qf, kf, vf, score_mod=score_mod)), (qf, kf, vf, bf)


def bench(fn, grad_inputs=None, mode="fwd"):
    if mode == "fwd":
        with torch.no_grad():
            run = fn
            run()
    else:
        out = fn()
        do = torch.randn_like(out)

        def run():
            o = fn()
            torch.autograd.grad(o, grad_inputs, do)
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms, p20, p80 = triton.testing.do_bench(run, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    return ms, p20, p80, peak


def main():
    dev = torch.cuda.get_device_name()
    log(kind="env", gpu=dev, torch=torch.__version__, triton=triton.__version__)
    # 1. correctness of the default configs
    shapes = [(2, 3, 17, 32), (1, 2, 100, 64), (1, 1, 129, 128), (1, 2, 256, 32), (1, 1, 63, 16)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (B, H, L, D) in shapes:
            for masked in (False, True):
                t = time.time()
                errs, nan = check(B, H, L, D, dtype, masked)
                log(kind="check", dtype=str(dtype), B=B, H=H, L=L, D=D, masked=masked, errs=errs, nan=nan,
                    s=round(time.time() - t, 2))
    # 2. determinism
    q, k, v, bias = make(2, 4, 96, 32, torch.float16)
    do = torch.randn_like(q)
    first = None
    same = True
    for _ in range(20):
        o = attention(q, k, v, bias)
        g = torch.autograd.grad(o, (q, k, v, bias), do)
        cur = [o] + list(g)
        if first is None:
            first = [x.clone() for x in cur]
        else:
            same &= all(torch.equal(a, b) for a, b in zip(first, cur, strict=True))
    log(kind="determinism", repeats=20, bitwise_equal=bool(same))

    # 2b. the D=64 backward: which launch configs give right gradients
    orig_b = ops.backward_config
    for var in [None, (64, 64, 4, 3, 1)]:
        if var is not None:
            ops.backward_config = fixed(var)
        for masked in (False, True):
            errs, nan = check(1, 2, 100, 64, torch.float16, masked)
            log(kind="check", dtype="torch.float16", B=1, H=2, L=100, D=64, masked=masked, errs=errs, nan=nan,
                cfg=var)
        ops.backward_config = orig_b
    # 2c. where the backward's time goes (kernel times from the profiler)
    q, k, v, bias = make(4, 8, 512, 32, torch.float16)
    do = torch.randn_like(q)
    for _ in range(2):
        torch.autograd.grad(attention(q, k, v, bias), (q, k, v, bias), do)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(attention(q, k, v, bias), (q, k, v, bias), do)
        torch.cuda.synchronize()
    for evt in prof.key_averages():
        if evt.device_time_total > 0:
            log(kind="profile", name=evt.key[:60], ms_per_call=evt.device_time_total / 5 / 1000, calls=evt.count)
    del q, k, v, bias, do

    # 3. timings: default config vs variants vs flex
    targets = [(4, 8, 256, 32, torch.float16), (4, 8, 512, 32, torch.float16), (1, 4, 1024, 32, torch.bfloat16)]
    if not QUICK:
        targets += [(4, 8, 768, 32, torch.float16)]
    # (forward config or None, fast exp2)
    fwd_variants = [(None, True), ((64, 64, 4, 3, 2), True), ((64, 64, 8, 3, 4), True), ((64, 32, 4, 3, 4), True),
                    ((128, 64, 8, 3, 4), True), ((64, 64, 4, 2, 4), True)]
    # (dq/dkdv config, dbias config, fast exp2)
    bwd_variants = [(None, None, True), ((64, 64, 4, 3, 1), None, True), ((64, 64, 8, 3, 2), None, True),
                    ((64, 32, 4, 3, 2), None, True), ((32, 64, 4, 3, 2), None, True), ((64, 64, 4, 2, 2), None, True)]
    orig_f, orig_b, orig_d = ops.forward_config, ops.backward_config, ops.dbias_config
    for (B, H, L, D, dtype) in targets:
        q, k, v, bias = make(B, H, L, D, dtype)
        shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))
        for mode, variants in (("fwd", fwd_variants), ("fwd_bwd", bwd_variants)):
            for var in variants:
                ops.FAST_EXP2 = var[-1]
                if mode == "fwd" and var[0] is not None:
                    ops.forward_config = fixed(var[0])
                if mode == "fwd_bwd" and var[0] is not None:
                    ops.backward_config = fixed(var[0])
                if mode == "fwd_bwd" and var[1] is not None:
                    ops.dbias_config = fixed(var[1])
                try:
                    ms, p20, p80, peak = bench(lambda q=q, k=k, v=v, bias=bias: attention(q, k, v, bias),
                                               (q, k, v, bias), mode)
                    log(kind="time", provider="flash_tt_attn", mode=mode, cfg=var, ms=ms, p20=p20, p80=p80,
                        peak_mb=peak, **shape)
                except Exception as e:  # noqa: BLE001
                    log(kind="time", provider="flash_tt_attn", mode=mode, cfg=var, error=repr(e)[:300], **shape)
                ops.forward_config, ops.backward_config, ops.dbias_config = orig_f, orig_b, orig_d
                ops.FAST_EXP2 = True
            try:
                fn, ins = flex_setup(q, k, v, bias)
                ms, p20, p80, peak = bench(fn, ins, mode)
                log(kind="time", provider="flex", mode=mode, ms=ms, p20=p20, p80=p80, peak_mb=peak, **shape)
            except Exception as e:  # noqa: BLE001
                log(kind="time", provider="flex", mode=mode, error=repr(e)[:300], **shape)
        del q, k, v, bias
        torch.cuda.empty_cache()

    print("\nSUMMARY")
    for r in rows:
        if r["kind"] == "check":
            bound = 2e-2 if "bfloat" in r["dtype"] else 5e-3
            flag = "NAN" if r["nan"] else ("BAD" if max(r["errs"]) > bound else "ok")
            print(flag, r["dtype"], r["L"], r["D"], r["masked"], r.get("cfg"), [f"{e:.1e}" for e in r["errs"]])
        elif r["kind"] == "time":
            ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error")
            print(r["provider"], r["mode"], r["B"], r["H"], r["L"], r["dtype"][6:], r.get("cfg"), ms,
                  f"{r.get('peak_mb', -1):.0f}")
        else:
            print(r)


if __name__ == "__main__":
    main()
