"""Launching the Triton kernels with less host time than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` binds every argument, specializes it, builds a cache key (a string of all
the options) and looks the compiled kernel up on every launch: about 30-40 µs of Python per launch on
the GPU machines' hosts, several times what the compiled kernel's own launcher needs. This module keeps,
per kernel, a cache from a cheap key of the call to the compiled kernel that Triton returned for it, and
calls that compiled kernel's launcher directly on a hit.

The key is finer than Triton's specialization, so that two calls with equal keys are always specialized
alike (a key that matched calls Triton specializes differently would launch a kernel compiled for other
arguments: a silent wrong result):

- tensors: dtype, and whether the data pointer is 16-byte aligned (all Triton looks at);
- integers and floats: their exact values and Python types (Triton looks at the type, whether an integer
  is 1, divisible by 16, or beyond 32 bits; equal values give equal answers);
- the constexpr and launch keyword arguments (tile sizes, dtypes, num_warps, ...): their values and types;
- the current CUDA device (Triton caches compiled kernels per device).

A caller that keeps its scalars and constants in a fixed plan (flash_tt_attn/ops.py does, one per call
signature) passes the plan's unique ``plan_key`` instead, and only the tensors are looked at per launch. A hit
whose launcher needs no scratch memory calls the launcher's C function directly, with the arguments its Python
``__call__`` would pass (no scratch buffers).

tests/test_launch.py checks the key against Triton's own specialization function on the cases that
matter (misaligned views, sizes not divisible by 16, strides of 1, 64-bit values). A miss, or any call
the fast path does not cover (the interpreter, a launch hook such as a profiler's, a Triton version this
was not checked against), goes through ``kernel[grid](...)`` as before; a hit then launches exactly the
compiled kernel that Triton launched for that key, with Triton's own launcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import triton
from triton import knobs

from ._compat import parse_version

# The launcher call below is JITFunction.run's own as Triton 3.6 writes it (the GPU machines' version). Other
# versions have changed the launcher's arguments before, so they take the normal launch until checked.
_CHECKED_TRITON = ((3, 6), (3, 6))


def _triton_is_checked() -> bool:
    version = parse_version(triton.__version__)[:2]
    return _CHECKED_TRITON[0] <= version <= _CHECKED_TRITON[1]


# Bounds the cache when shapes keep changing (each entry is a few tuples; a miss costs one normal launch).
MAX_ENTRIES = 4096


def tensor_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """What Triton specializes a tensor argument on: its dtype and whether its data pointer is 16-byte aligned."""
    return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


def call_key(tensors: Sequence[torch.Tensor], scalars: tuple, constants: dict) -> tuple:
    """The cache key of one launch, finer than Triton's specialization: the tensors' dtypes and 16-byte
    alignment, the integer and float arguments' exact values and types, and the constants' values. Two
    calls with equal keys are specialized alike by Triton; unequal keys only cost a normal launch."""
    return (
        tensor_key(tensors),
        scalars,
        tuple(map(type, scalars)),  # 1 == 1.0 == True as values; Triton tells int, float and bool apart
        tuple(constants.items()),
        tuple(map(type, constants.values())),  # likewise True and 1 as a constexpr
    )


def _no_hook(hook) -> bool:
    """Whether a Triton launch hook (None, or a chain of hooks in Triton 3.6) would call nothing; a profiler
    such as Proton adds hooks, and its launches then go through Triton, which calls them."""
    return hook is None or not getattr(hook, "calls", True)


class FastLauncher:
    """Launches one @triton.jit kernel, past JITFunction.run's binder once a call's key has been seen.

    ``launch(grid, tensors, scalars, constants)`` is ``kernel[grid](*tensors, *scalars, **constants)``:
    the kernel's leading parameters are the tensors, then the integers and floats; ``constants`` name its
    remaining parameters (constexprs) and launch options (num_warps, num_stages, maxnreg).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        # The interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions and always launch through Triton.
        self.enabled = isinstance(kernel, triton.runtime.jit.JITFunction) and _triton_is_checked()
        self._cache: dict = {}
        params = getattr(kernel, "params", [])
        self._params = [p.name for p in params]
        self._defaults = {p.name: p.default for p in params if p.has_default}
        self.hits = 0  # launches past Triton's binder
        self.misses = 0  # launches through kernel[grid](...)

    # Where Triton's CUDA driver gets the device and stream of a launch (tests replace them).
    current_device = staticmethod(lambda: torch.cuda.current_device())
    current_stream = staticmethod(lambda device: torch._C._cuda_getCurrentRawStream(device))

    def _tail(self, n_args: int, constants: dict) -> tuple:
        """The values of the parameters after the positional ones, in the kernel's order."""
        names = self._params[n_args:]
        missing = [n for n in names if n not in constants and n not in self._defaults]
        if missing:
            raise TypeError(f"{self.kernel.__name__}: no value for {missing}")
        return tuple(constants[n] if n in constants else self._defaults[n] for n in names)

    def launch(self, grid: tuple, tensors: Sequence[torch.Tensor], scalars: tuple, constants: dict,
               plan_key: Optional[int] = None) -> None:
        """``plan_key``, when given, stands for ``scalars`` and ``constants`` (a caller's identifier that is never
        reused for other values), so that they need not be hashed on every launch."""
        runtime = knobs.runtime
        if not (self.enabled and _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook)):
            self.kernel[grid](*tensors, *scalars, **constants)
            return
        device = self.current_device()
        if plan_key is None:
            key = (device, call_key(tensors, scalars, constants))
        else:
            key = (device, plan_key, tensor_key(tensors))
        entry = self._cache.get(key)
        if entry is None:
            self.misses += 1
            compiled = self.kernel[grid](*tensors, *scalars, **constants)
            if compiled is not None and not hasattr(compiled, "result"):  # not an asynchronous compile
                if len(self._cache) >= MAX_ENTRIES:
                    self._cache.clear()
                tail = self._tail(len(tensors) + len(scalars), constants)
                self._cache[key] = _CacheEntry.of(compiled, tail)
            return
        self.hits += 1
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = self.current_stream(device)
        if entry.c_launch is not None:  # the compiled launcher's C function, as its __call__ would call it
            entry.c_launch(grid[0], g1, g2, stream, entry.function, entry.cooperative, entry.pdl, None, None,
                           entry.packed_metadata, None, None, None, *tensors, *scalars, *entry.tail)
        else:
            entry.run(grid[0], g1, g2, stream, entry.function, entry.packed_metadata, None, None, None,
                      *tensors, *scalars, *entry.tail)


class _CacheEntry(NamedTuple):
    run: object  # the compiled kernel's launcher (Triton 3.6: a CudaLauncher)
    function: object
    packed_metadata: object
    tail: tuple
    c_launch: object  # the launcher's C function when it needs no scratch memory, else None
    cooperative: object
    pdl: object

    @classmethod
    def of(cls, compiled, tail: tuple) -> _CacheEntry:
        run = compiled.run
        c_launch = getattr(run, "launch", None)
        no_scratch = getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
        if not (no_scratch and getattr(run, "num_ctas", 1) == 1 and callable(c_launch)):
            c_launch = None
        return cls(run, compiled.function, compiled.packed_metadata, tail, c_launch,
                   getattr(run, "launch_cooperative_grid", None), getattr(run, "launch_pdl", None))
