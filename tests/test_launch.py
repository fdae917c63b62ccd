"""The launch cache (flash_tt_attn/launch.py): its key separates every call Triton specializes differently,
a miss goes through Triton, and a hit calls the compiled kernel's launcher with the call's arguments."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from triton.backends import BaseBackend

from flash_tt_attn import launch

native_specialize_impl = pytest.importorskip("triton._C.libtriton").native_specialize_impl


def triton_specialization(tensors, scalars) -> tuple:
    """What Triton compiles a kernel for, argument by argument (as JITFunction.run's binder asks it)."""
    return tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in (*tensors, *scalars))


def test_calls_that_triton_specializes_differently_get_different_keys():
    storage = torch.zeros(4096, dtype=torch.float16)
    tensors = {
        "aligned fp16": storage[:64],
        "misaligned view": storage[1:65],  # 2 bytes past a 16-byte boundary
        "aligned at 16 bytes": storage[8:72],
        "bf16": torch.zeros(64, dtype=torch.bfloat16),
        "uint8 mask": torch.zeros(64, dtype=torch.uint8),
        "misaligned uint8": torch.zeros(80, dtype=torch.uint8)[3:67],
    }
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 100, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -1, -16, 2**63, 2**64 - 16]
    others = [0.125, 1.0, 2.0, True, False, None]
    scalar_lists = [(a, b) for a, b in itertools.product(ints + others, [1, 16, 0.5])]
    calls = [((t,), s) for t in tensors.values() for s in scalar_lists]
    seen: dict = {}
    for tensors_, scalars in calls:
        key = launch.call_key(tensors_, scalars, {"BLOCK": 64})
        spec = triton_specialization(tensors_, scalars)
        if key in seen:
            assert seen[key] == spec, (tensors_[0].dtype, scalars)
        seen[key] = spec
    # The cases the specialization distinguishes are really there (the test would pass vacuously otherwise).
    assert len(set(seen.values())) > 40


def test_constants_are_part_of_the_key():
    t = (torch.zeros(8),)
    assert launch.call_key(t, (8,), {"BLOCK": 64}) != launch.call_key(t, (8,), {"BLOCK": 32})
    assert launch.call_key(t, (8,), {"EVEN": True}) != launch.call_key(t, (8,), {"EVEN": 1})


class FakeCompiled:
    """What JITFunction.run returns: a compiled kernel whose ``run`` is its launcher."""

    def __init__(self, log):
        self.function, self.packed_metadata = "function", "metadata"
        self.run = lambda *args: log.append(("compiled", args))


class FakeKernel:
    """A @triton.jit kernel's interface as the launcher uses it: params, and kernel[grid](...)."""

    def __init__(self, names, defaults):
        self.__name__ = "fake_kernel"
        self.params = [SimpleNamespace(name=n, has_default=n in defaults, default=defaults.get(n)) for n in names]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return getattr(self, "compiled", None) or FakeCompiled(self.log)
        return run


def fake_launcher(kernel) -> launch.FastLauncher:
    launcher = launch.FastLauncher(kernel)
    launcher.enabled = True  # a fake kernel is no JITFunction; the GPU tests run the real ones
    launcher.current_device = lambda: 0
    launcher.current_stream = lambda device: 1234
    return launcher


def test_a_miss_launches_through_triton_and_a_hit_through_the_compiled_launcher():
    kernel = FakeKernel(["X", "n", "scale", "BLOCK", "STAGES"], defaults={"STAGES": None})
    launcher = fake_launcher(kernel)
    x = torch.zeros(16)
    launcher.launch((4, 2), (x,), (16, 0.5), {"BLOCK": 32, "num_warps": 4})
    assert kernel.log == [("triton", (4, 2), (x, 16, 0.5), {"BLOCK": 32, "num_warps": 4})]
    kernel.log.clear()
    launcher.launch((4, 2), (x,), (16, 0.5), {"BLOCK": 32, "num_warps": 4})
    # Triton's launcher: grid (padded to 3-D), stream, function, metadata, no launch metadata or hooks, then
    # every parameter in order, the constexprs' values and defaults included.
    assert kernel.log == [("compiled", (4, 2, 1, 1234, "function", "metadata", None, None, None, x, 16, 0.5, 32, None))]
    assert (launcher.hits, launcher.misses) == (1, 1)


@pytest.mark.parametrize("change", ["misaligned", "dtype", "integer", "constant", "device"])
def test_any_change_of_what_triton_specializes_on_is_a_miss(change):
    kernel = FakeKernel(["X", "n", "BLOCK"], defaults={})
    launcher = fake_launcher(kernel)
    storage = torch.zeros(64)
    launcher.launch((1,), (storage[:16],), (16,), {"BLOCK": 16})
    args = {"tensors": (storage[:16],), "scalars": (16,), "constants": {"BLOCK": 16}}
    if change == "misaligned":
        args["tensors"] = (storage[1:17],)
    elif change == "dtype":
        args["tensors"] = (storage[:16].half(),)
    elif change == "integer":
        args["scalars"] = (1,)
    elif change == "constant":
        args["constants"] = {"BLOCK": 32}
    else:
        launcher.current_device = lambda: 1
    kernel.log.clear()
    launcher.launch((1,), args["tensors"], args["scalars"], args["constants"])
    assert kernel.log[0][0] == "triton" and launcher.misses == 2


def test_launch_hooks_and_unchecked_kernels_go_through_triton(monkeypatch):
    kernel = FakeKernel(["X", "BLOCK"], defaults={})
    launcher = fake_launcher(kernel)
    x = torch.zeros(4)
    for _ in range(2):
        launcher.launch((1,), (x,), (), {"BLOCK": 4})
    assert [entry[0] for entry in kernel.log] == ["triton", "compiled"]
    hooks = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[print]), launch_exit_hook=None)
    monkeypatch.setattr(launch.knobs, "runtime", hooks)
    launcher.launch((1,), (x,), (), {"BLOCK": 4})  # a profiler's hook must see the launch
    monkeypatch.undo()
    launcher.enabled = False
    launcher.launch((1,), (x,), (), {"BLOCK": 4})
    assert [entry[0] for entry in kernel.log] == ["triton", "compiled", "triton", "triton"]


def test_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(launch, "MAX_ENTRIES", 3)
    kernel = FakeKernel(["X", "n"], defaults={})
    launcher = fake_launcher(kernel)
    for n in range(10):
        launcher.launch((1,), (torch.zeros(2),), (n,), {})
    assert len(launcher._cache) <= 3


def test_only_checked_triton_versions_skip_the_binder(monkeypatch):
    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    assert launch._triton_is_checked()
    for version in ("3.5.1", "3.7.0", "3.9.0"):
        monkeypatch.setattr(launch.triton, "__version__", version)
        assert not launch._triton_is_checked()


class FakeCudaLauncher:
    """Triton 3.6's CudaLauncher as the cache uses it: its C ``launch`` function and scratch sizes."""

    def __init__(self, log, scratch):
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.num_ctas = 1
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.launch = lambda *args: log.append(("c_launch", args))
        self.log = log

    def __call__(self, *args):
        self.log.append(("compiled", args))


@pytest.mark.parametrize("scratch", [0, 256], ids=["no-scratch", "scratch"])
def test_a_hit_calls_the_c_launcher_directly_only_when_no_scratch_memory_is_needed(scratch):
    kernel = FakeKernel(["X", "n", "BLOCK"], defaults={})
    kernel.compiled = FakeCompiled(kernel.log)
    kernel.compiled.run = FakeCudaLauncher(kernel.log, scratch)
    launcher = fake_launcher(kernel)
    x = torch.zeros(8)
    launcher.launch((2, 3), (x,), (8,), {"BLOCK": 8}, plan_key=7)
    kernel.log.clear()
    launcher.launch((2, 3), (x,), (8,), {"BLOCK": 8}, plan_key=7)
    if scratch == 0:
        # as CudaLauncher.__call__ would call it: grid, stream, function, cooperative, pdl, no scratch buffers,
        # metadata, no launch metadata or hooks, then the arguments
        assert kernel.log == [("c_launch", (2, 3, 1, 1234, "function", False, True, None, None, "metadata",
                                            None, None, None, x, 8, 8))]
    else:
        assert kernel.log == [("compiled", (2, 3, 1, 1234, "function", "metadata", None, None, None, x, 8, 8))]


def test_a_plan_key_stands_for_scalars_and_constants_but_not_for_the_tensors():
    kernel = FakeKernel(["X", "n"], defaults={})
    launcher = fake_launcher(kernel)
    storage = torch.zeros(64)
    launcher.launch((1,), (storage[:16],), (16,), {}, plan_key=1)
    launcher.launch((1,), (storage[:16],), (16,), {}, plan_key=1)  # hit
    launcher.launch((1,), (storage[1:17],), (16,), {}, plan_key=1)  # misaligned: a miss
    launcher.launch((1,), (storage[:16].half(),), (16,), {}, plan_key=1)  # another dtype: a miss
    launcher.launch((1,), (storage[:16],), (16,), {}, plan_key=2)  # another plan: a miss
    assert (launcher.hits, launcher.misses) == (1, 4)
