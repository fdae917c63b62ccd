"""Triton kernels (``@triton.jit`` functions only: no torch, no autograd, no validation)."""
