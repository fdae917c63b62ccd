"""GPU probe 43: the host's time per eager call taken apart by layer, at a shape whose kernels take a few µs
(B=1 H=1 L=32 D=32 bf16), so that the host sets the pace (probes 41-42: 1.5 ms per forward+backward, of which
0.47 ms in Triton's launches, against 0.13 ms per forward under no_grad).

Per call, 500 calls back to back after a warm-up, three rounds:
- fwd_no_grad: attention() under no_grad;
- fwd_grad: attention() on inputs that require grad (the autograd graph built, the output dropped);
- fwd_body: the forward op's own Python (``attention_fwd._init_fn``: launches, no dispatch);
- bwd_op: the backward op called on the main thread (``ops.attention_bwd``);
- bwd_body: the backward op's own Python (``attention_bwd._init_fn``);
- bwd_engine: ``torch.autograd.grad`` through a graph kept from one forward (``retain_graph=True``): the
  backward as autograd runs it, on its CUDA device thread;
- fwd_bwd: attention() then ``torch.autograd.grad``, as probe 41 timed it.

Usage: python experiments/scripts/probe43.py OUT_DIR
"""

import sys
import time

import torch
import triton
import tune_kernels as tk

from flash_tt_attn import attention, ops


def per_call_us(step, n=500):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    B, H, L, D = 1, 1, 32, 32
    shape = dict(B=B, H=H, L=L, D=D, dtype="bfloat16")
    inputs = tk.make(B, H, L, D, torch.bfloat16)
    q, k, v, bias = inputs
    scale = D ** -0.5
    dout = torch.randn_like(q)
    with torch.no_grad():
        out, lse = ops.attention_fwd(q, k, v, bias, None, scale)
    kept = attention(*inputs)

    def fwd_no_grad():
        with torch.no_grad():
            attention(*inputs)

    def fwd_grad():
        attention(*inputs)

    def fwd_body():
        ops.attention_fwd._init_fn(q, k, v, bias, None, scale)

    def bwd_op():
        ops.attention_bwd(dout, q, k, v, bias, None, out, lse, scale)

    def bwd_body():
        ops.attention_bwd._init_fn(dout, q, k, v, bias, None, out, lse, scale)

    def bwd_engine():
        torch.autograd.grad(kept, inputs, dout, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(attention(*inputs), inputs, dout)

    steps = dict(fwd_no_grad=fwd_no_grad, fwd_grad=fwd_grad, fwd_body=fwd_body, bwd_op=bwd_op, bwd_body=bwd_body,
                 bwd_engine=bwd_engine, fwd_bwd=fwd_bwd)
    for step in steps.values():
        for _ in range(20):
            step()
    for round_ in range(3):
        for name, step in steps.items():
            if name in ("bwd_op", "bwd_body"):
                with torch.no_grad():
                    us = per_call_us(step)
            else:
                us = per_call_us(step)
            tk.log(kind="host", call=name, round=round_, host_us_per_call=us, **shape)


if __name__ == "__main__":
    main()
