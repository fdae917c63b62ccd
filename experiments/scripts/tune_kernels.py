"""GPU probe for kernel development: correctness of each launch config, then timings
against FlexAttention, in one process (one device call). Not part of the published
pipeline (that is `python -m flash_tt_attn.bench`); its raw output goes to PERF.md.

Usage: python experiments/scripts/tune_kernels.py OUT_DIR [--quick] [--wide | --all-head-dims] [--no-flex]
       ncu ... python experiments/scripts/tune_kernels.py OUT_DIR --ncu [--pipelined]
"""

import json
import sys

import torch
import triton

from flash_tt_attn import attention, ops
from flash_tt_attn.reference import attention_chunked

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
QUICK = "--quick" in sys.argv
WIDE = "--wide" in sys.argv  # head dims 64 and 128 only
BOTH = "--all-head-dims" in sys.argv
NO_FLEX = "--no-flex" in sys.argv  # variants only: compiling flex for every shape dominates a probe's time
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


def forward_op(q, k, v, bias, scale):
    """The library's forward op without a mask: (output, base-2 log-sum-exp)."""
    return torch.ops.flash_tt_attn.attention_fwd(q, k, v, bias, None, scale)


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


def fp64_reference(inputs, dout, chunk_rows=8):
    """The output and the gradients of (q, k, v, bias) from the fp64 reference, detached."""
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out = attention_chunked(*ref_in, scale=None, chunk_rows=chunk_rows)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, ref_in, dout.double())]


def output_and_grads(call, inputs, dout):
    """call()'s output, detached, and the gradients of inputs under dout."""
    out = call()
    return [out.detach()] + list(torch.autograd.grad(out, inputs, dout))


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


CHOOSERS = ("forward_config", "dq_config", "dkdv_config", "dbias_config", "dbias_splits")
SWITCHES = ("SETTLE_ACCUMULATORS", "DBIAS_UNSCALED_SCORES")


def with_configs(configs, fn, *args):
    """fn(*args) with some kernel configs fixed: configs maps a chooser name to LaunchConfig args
    (or "dbias_splits" to a number of row splits), or one of ops' SWITCHES to its setting."""
    saved = {name: getattr(ops, name) for name in CHOOSERS + SWITCHES}
    try:
        for name, values in configs.items():
            if name == "dbias_splits":
                ops.dbias_splits = lambda *args, n=values: n
            elif name in SWITCHES:
                setattr(ops, name, values)
            else:
                setattr(ops, name, fixed(values))
        return fn(*args)
    finally:
        for name, chooser in saved.items():
            setattr(ops, name, chooser)


# Probe 10's code, before probe 11: both switches off, dk/dv at D = 32 capped at 128 registers.
SWITCHES_OFF = {"SETTLE_ACCUMULATORS": False, "DBIAS_UNSCALED_SCORES": False}
OLD_D32 = dict(SWITCHES_OFF, dkdv_config=(64, 64, 4, 3, 1, True, True, 128))


def log_kernel_profile(tag, configs, call, inputs, dout, warmup, runs, **fields):
    """Device time per kernel of forward+backward calls under configs (see with_configs), one row each."""
    def profile():
        for _ in range(warmup):
            torch.autograd.grad(call(), inputs, dout)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                torch.autograd.grad(call(), inputs, dout)
            torch.cuda.synchronize()
        return prof
    for evt in with_configs(configs, profile).key_averages():
        if evt.device_time_total > 0:
            log(kind="profile", cfg=tag, name=evt.key[:60], ms_per_call=evt.device_time_total / runs / 1000,
                calls=evt.count, **fields)


def time_target(target, fv, bv, profiled):
    B, H, L, D, dtype = target
    q, k, v, bias = make(B, H, L, D, dtype)
    inputs = (q, k, v, bias)
    shape = dict(B=B, H=H, L=L, D=D, dtype=str(dtype))

    def call():
        return attention(q, k, v, bias)
    for mode, variants in (("fwd", fv), ("fwd_bwd", bv)):
        for name, var in variants.items():
            if mode == "fwd":
                configs = var if isinstance(var, dict) else ({"forward_config": var} if var else {})
            else:
                configs = dict(var)
            try:
                ms, p20, p80, peak = with_configs(configs, bench, call, inputs, mode)
                log(kind="time", provider="flash_tt_attn", mode=mode, cfg=name, ms=ms, p20=p20, p80=p80,
                    peak_mb=peak, **shape)
            except Exception as e:  # noqa: BLE001
                log(kind="time", provider="flash_tt_attn", mode=mode, cfg=name, error=repr(e)[:300], **shape)
        if NO_FLEX:
            continue
        try:
            fn, ins = flex_setup(q, k, v, bias)
            ms, p20, p80, peak = bench(fn, ins, mode)
            log(kind="time", provider="flex", mode=mode, ms=ms, p20=p20, p80=p80, peak_mb=peak, **shape)
        except Exception as e:  # noqa: BLE001
            log(kind="time", provider="flex", mode=mode, error=repr(e)[:300], **shape)
    if L != 512 or D != 32:
        return
    # where the time goes, per kernel
    do = torch.randn_like(q)
    for tag, configs in profiled.items():
        log_kernel_profile(tag, configs, call, inputs, do, warmup=2, runs=5)


def main():
    dev = torch.cuda.get_device_name()
    log(kind="env", gpu=dev, torch=torch.__version__, triton=triton.__version__)
    # Variants: LaunchConfig(block_j, block_k, num_warps, num_stages, rows, pipeline_all_loads, key_major_bias,
    # max_registers); "dbias_splits" fixes the bias gradient's row splits.
    P, K = True, True
    # Probe 11 ran this script at 74186d1, where the forward's order was a third switch
    # (FORWARD_SCORES_FIRST, now always on). Defaults: every switch on, dk/dv at D = 32 capped at 168
    # registers. OLD is probe 10's defaults: every switch off and dk/dv capped at 128 registers.
    #   SETTLE_ACCUMULATORS: dq and dk/dv wait for their accumulating product within each iteration; ptxas
    #     serialized every wgmma of both kernels before (C7515). dk/dv then needs 175 registers (spills at 128).
    #   DBIAS_UNSCALED_SCORES: bias/scale as the accumulator of the unscaled q·kᵀ (no per-iteration q rescale).
    off, old32 = SWITCHES_OFF, OLD_D32
    fwd32 = {"F0": None}
    bwd32 = {"B0": {}, "OLD": old32, "N0": {"dkdv_config": (64, 64, 4, 3, 1, P, K)},
             "S0": {"SETTLE_ACCUMULATORS": False}, "U0": {"DBIAS_UNSCALED_SCORES": False}}
    bwd32.update(B0_again={}, OLD_again=old32)  # each timed twice
    fwd128 = {"F0": None, "F8": {"forward_config": (128, 64, 8, 2, 1, P)}}
    bwd128 = {"B0": {}, "OLD": off, "Q8": {"dq_config": (128, 64, 8, 2, 1, P)},
              "K8": {"dkdv_config": (64, 128, 8, 2, 1, P, K)}, "D8": {"dbias_config": (128, 32, 8, 2, 1, P)}}
    fwd64 = {"F0": None}
    bwd64 = {"B0": {}, "OLD": off}

    # 1. correctness of the defaults and of each kernel variant against the fp64 reference: an even L
    #    (the unmasked code the timings run) in fp16, and an odd L with a mask in fp16 and bf16.
    groups = [(32, fwd32, bwd32, 128, 33), (64, fwd64, bwd64, 128, 100), (128, fwd128, bwd128, 128, 129)]
    groups = [g for g in groups if BOTH or (g[0] == 32) != WIDE]
    for D, fv, bv, even_L, odd_L in groups:
        variants = [("default", {})] \
            + [(f, fv[f] if isinstance(fv[f], dict) else {"forward_config": fv[f]}) for f in fv if fv[f]] \
            + [(b, bv[b]) for b in bv if bv[b] and not b.endswith("_again")]
        for dtype, L, masked in ((torch.float16, even_L, False), (torch.float16, odd_L, True),
                                 (torch.bfloat16, odd_L, True)):
            B, H = (2, 3) if D == 32 else (1, 2)
            for name, configs in variants:
                errs, nan = with_configs(configs, check, B, H, L, D, dtype, masked)
                log(kind="check", dtype=str(dtype), B=B, H=H, L=L, D=D, masked=masked, errs=errs, nan=nan, cfg=name)
    # 2. determinism of the pipelined variants
    det_inputs = make(2, 4, 96, 32, torch.float16)
    det_dout = torch.randn_like(det_inputs[0])

    def grads_once():
        o = attention(*det_inputs)
        return [o] + list(torch.autograd.grad(o, det_inputs, det_dout))
    first = with_configs(old32, grads_once)
    same = all(all(torch.equal(a, b) for a, b in zip(first, with_configs(old32, grads_once), strict=True))
               for _ in range(20))
    first_new = grads_once()
    same_new = all(all(torch.equal(a, b) for a, b in zip(first_new, grads_once(), strict=True)) for _ in range(20))
    log(kind="determinism", repeats=20, bitwise_equal=bool(same), cfg="OLD")
    log(kind="determinism", repeats=20, bitwise_equal=bool(same_new), cfg="default")
    # the register cap is dropped while torch.compile traces the launches: same results, bitwise
    compiled = torch.compile(attention, fullgraph=True)

    def compiled_grads():
        o = compiled(*det_inputs)
        return [o] + list(torch.autograd.grad(o, det_inputs, det_dout))
    try:
        compiled_out = compiled_grads()
        same_compiled = [bool(torch.equal(a, b)) for a, b in zip(first_new, compiled_out, strict=True)]
        log(kind="compile_check", bitwise_equal_to_eager=same_compiled, cfg="default",
            max_rel=[rel(a, b) for a, b in zip(compiled_out, first_new, strict=True)])
    except Exception as e:  # noqa: BLE001
        log(kind="compile_check", error=repr(e)[:500], cfg="default")

    # 3. timings: variants vs flex, one process
    targets = [((4, 8, 256, 32, torch.float16), fwd32, bwd32), ((4, 8, 512, 32, torch.float16), fwd32, bwd32),
               ((1, 4, 1024, 32, torch.bfloat16), fwd32, bwd32), ((1, 4, 512, 64, torch.bfloat16), fwd64, bwd64),
               ((1, 4, 512, 128, torch.bfloat16), fwd128, bwd128)]
    if not QUICK:
        short = {k: bwd32[k] for k in ("B0", "OLD", "B0_again", "OLD_again")}
        targets.insert(2, ((4, 8, 768, 32, torch.float16), fwd32, short))
    for target, fv, bv in targets:
        if not BOTH and (target[3] == 32) == WIDE:
            continue
        time_target(target, fv, bv, {"default": {}, "OLD": old32, "N0": bwd32["N0"]})
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


def profile_target():
    """For `ncu`: three forward and backward calls at B=4 H=8 L=512 D=32 fp16 with the configs named on the
    command line (--pipelined: every kernel with pipeline_all_loads)."""
    q, k, v, bias = make(4, 8, 512, 32, torch.float16)
    do = torch.randn_like(q)
    configs = {}
    if "--pipelined" in sys.argv:
        configs = {"forward_config": (64, 64, 4, 3, 2, True), "dq_config": (64, 64, 4, 3, 1, True),
                   "dkdv_config": (64, 64, 4, 3, 1, True), "dbias_config": (64, 64, 4, 3, 1, True)}

    def run():
        for _ in range(3):
            torch.autograd.grad(attention(q, k, v, bias), (q, k, v, bias), do)
        torch.cuda.synchronize()
    with_configs(configs, run)


if __name__ == "__main__":
    profile_target() if "--ncu" in sys.argv else main()
