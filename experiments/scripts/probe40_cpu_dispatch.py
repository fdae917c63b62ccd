"""CPU companion of probe 40: the host cost of torch's custom-op dispatch alone, with trivial bodies (no kernels).

A triton_op forward with a registered autograd formula and a triton_op backward (the library's pattern), against
an autograd.Function calling the same bodies, each timed over 2000 forward+backward steps on tiny CPU tensors,
plus the op's forward under no_grad; two rounds. On the development machine (torch 2.13 CPU): 130-132 µs per
step through the ops, 99-103 µs through the Function, 18 µs per forward under no_grad, so the dispatch costs
about 30 µs per forward+backward.

Usage: python experiments/scripts/probe40_cpu_dispatch.py
"""

import time
from typing import Optional

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op

Tensor = torch.Tensor


def forward_body(q, k, v, bias, mask, scale):
    return torch.empty_like(q), torch.empty(q.shape[:-1])


def backward_body(dout, q, k, v, bias, mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


@triton_op("probe40::fwd", mutates_args=())
def op_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Optional[Tensor],
           scale: float) -> tuple[Tensor, Tensor]:
    return forward_body(q, k, v, bias, mask, scale)


@triton_op("probe40::bwd", mutates_args=())
def op_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Optional[Tensor], out: Tensor,
           lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backward_body(dout, q, k, v, bias, mask, out, lse, scale)


def setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale = inputs
    ctx.save_for_backward(q, k, v, bias, mask, *output)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def op_backward(ctx, dout, dlse):
    return (*op_bwd(dout, *ctx.saved_tensors, ctx.scale), None, None)


torch.library.register_autograd("probe40::fwd", op_backward, setup_context=setup_context)


class Direct(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, bias, mask, scale):
        with set_wrap_triton_enabled(False):
            return forward_body(q, k, v, bias, mask, scale)

    setup_context = staticmethod(setup_context)

    @staticmethod
    def backward(ctx, dout, dlse):
        with set_wrap_triton_enabled(False):
            return (*backward_body(dout, *ctx.saved_tensors, ctx.scale), None, None)


def main():
    q, k, v = (torch.randn(1, 1, 4, 4, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 4, 4, requires_grad=True)

    def through_ops():
        out, _ = op_fwd(q, k, v, bias, None, 0.25)
        out.backward(torch.ones_like(out))

    def through_function():
        out, _ = Direct.apply(q, k, v, bias, None, 0.25)
        out.backward(torch.ones_like(out))

    def op_forward_no_grad():
        with torch.no_grad():
            op_fwd(q, k, v, bias, None, 0.25)

    steps = [("ops fwd+bwd", through_ops), ("Function fwd+bwd", through_function), ("ops fwd no_grad",
                                                                                      op_forward_no_grad)]
    for name, step in steps * 2:
        for _ in range(100):
            step()
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(f"{name}: {(time.perf_counter() - start) / n * 1e6:.1f} µs per step")


if __name__ == "__main__":
    main()
