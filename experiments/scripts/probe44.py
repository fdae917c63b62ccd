"""GPU probe 44: how much of a Triton launch's host time a cached launch could save (PERF.md next step 8).

At B=1 H=1 L=32 D=32 bf16 (kernels of a few µs), one eager forward+backward is run with every launch captured
(kernel, grid, arguments). Then, for each captured launch, 1000 launches back to back of:
- full: ``kernel[grid](*args, **kwargs)`` as the library launches it (Triton's ``JITFunction.run``: binding,
  specialization, cache key, launch);
- bind: the binder alone (arguments to bound values, specialization and options);
- raw: the compiled kernel's own launcher with the bound values of the first call (what a launch cache that
  skipped ``JITFunction.run`` would call; Triton 3.6's internals, this probe only).
Three rounds. Host µs per launch.

Usage: python experiments/scripts/probe44.py OUT_DIR
"""

import sys
import time

import torch
import triton
import tune_kernels as tk
from triton.runtime import driver, jit

from flash_tt_attn import attention, ops

captured = []
_wrap_triton = ops.wrap_triton


class _Capture:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launcher = _wrap_triton(self.kernel)[grid]

        def launch(*args, **kwargs):
            captured.append((self.kernel, grid, args, kwargs))
            return launcher(*args, **kwargs)
        return launch


def per_launch_us(fn, n=1000):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def launchers(kernel, grid, args, kwargs):
    """The three ways to launch one captured call."""
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, kernel_key_cache, _, _, binder = kernel.device_caches[device]
    full_kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or jit.knobs.runtime.debug,
                       instrumentation_mode=jit.knobs.compilation.instrumentation_mode)
    bound_args, specialization, options = binder(*args, **full_kwargs)
    compiled = kernel_cache[jit.compute_cache_key(kernel_key_cache, specialization, options)]
    compiled._init_handles()
    values = tuple(bound_args.values())
    grid_3 = tuple(grid) + (1,) * (3 - len(grid))
    metadata = compiled.launch_metadata(grid_3, stream, *values)

    def full():
        kernel[grid](*args, **kwargs)

    def bind():
        binder(*args, **full_kwargs)

    def raw():
        compiled.run(*grid_3, stream, compiled.function, compiled.packed_metadata, metadata, None, None, *values)
    return dict(full=full, bind=bind, raw=raw)


def main():
    tk.OUT = sys.argv[1] if len(sys.argv) > 1 else "."
    tk.log(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    shape = dict(B=1, H=1, L=32, D=32, dtype="bfloat16")
    inputs = tk.make(1, 1, 32, 32, torch.bfloat16)
    dout = torch.randn_like(inputs[0])
    torch.autograd.grad(attention(*inputs), inputs, dout)  # compile everything first
    ops.wrap_triton = _Capture
    torch.autograd.grad(attention(*inputs), inputs, dout)
    ops.wrap_triton = _wrap_triton
    ways = [(kernel.__name__, launchers(kernel, grid, args, kwargs)) for kernel, grid, args, kwargs in captured]
    for round_ in range(3):
        for name, calls in ways:
            times = {way: per_launch_us(call) for way, call in calls.items()}
            tk.log(kind="launch", kernel=name, round=round_, **{f"{way}_us": us for way, us in times.items()},
                   **shape)


if __name__ == "__main__":
    main()
