"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import torch


def forward_and_grads(fn, q, k, v, bias, dout, **kwargs):
    """fn's output and its gradients for q, k, v and bias (fresh leaves, the inputs' strides kept)."""
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = fn(*ins, **kwargs)
    grads = torch.autograd.grad(out, ins, dout)
    return [out.detach(), *grads]
