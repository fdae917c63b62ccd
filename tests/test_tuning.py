"""The tuning table (flash_tt_attn/tuning.py) and the launchers' options (ops.KernelOptions, ops.override)."""

import pytest
import torch
from torch._library.triton import set_wrap_triton_enabled

from flash_tt_attn import ops, tuning

GPU = torch.device("cuda", 0)  # a device object only: nothing runs


def test_every_kernel_head_dim_and_dtype_class_has_an_entry_that_says_why():
    for kernel in tuning.KERNELS:
        for head_dim in (16, 32, 64, 128):
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                entry = tuning.TABLE[kernel, tuning.head_dim_class(head_dim), tuning.dtype_class(dtype)]
                assert len(entry.why) > 20, (kernel, head_dim, dtype)


def test_traced_launches_never_get_a_config_that_needs_a_register_cap_they_cannot_carry():
    """A traced launch (torch.compile) drops maxnreg; entries whose eager config relies on it for occupancy
    name an uncapped stand-in, and the only capped config left for traced launches is dk/dv's at D = 32,
    whose accumulators then run serialized (ops._settle) and need no cap."""
    capped = []
    for kernel in tuning.KERNELS:
        for head_dim in (16, 32, 64, 128):
            with ops.override(shared_memory_per_program=232_448), set_wrap_triton_enabled(True):
                traced = ops.launch_config(kernel, 512, head_dim, torch.bfloat16, GPU)
                if traced.max_registers is not None:
                    capped.append((kernel, head_dim))
                    assert not ops._settle(torch.bfloat16, GPU, traced)
                    assert "maxnreg" not in ops._launch_options(traced)
    assert capped == [("dkdv", 16), ("dkdv", 32)]


def test_register_caps_off_launches_every_config_uncapped():
    """The variant switch register_caps=False (what a cap buys, measured in spec padding) drops maxnreg from
    every launch and changes nothing else; the forward at D <= 32 is capped at 168 (three programs per SM)."""
    with set_wrap_triton_enabled(False):  # as inside the custom op's eager call
        capped = ops.launch_config("forward", 512, 32, torch.bfloat16, GPU)
        assert capped.max_registers == 168 and ops._launch_options(capped)["maxnreg"] == 168
        with ops.override(register_caps=False):
            assert ops.launch_config("forward", 512, 32, torch.bfloat16, GPU) == capped
            assert ops._launch_options(capped) == dict(LOOP_STAGES=3, num_warps=4, num_stages=3)


def test_interpreter_configs_are_small_and_keep_the_gpus_rows_per_program():
    cpu = torch.device("cpu")
    assert ops.launch_config("forward", 8, 32, torch.float32, cpu) == ops.LaunchConfig(16, 16, 1, 1, rows=2)
    assert ops.launch_config("dq", 100, 32, torch.float16, cpu) == ops.LaunchConfig(32, 32, 1, 1, rows=1)


def test_override_is_scoped_and_restores_the_options_after_an_error():
    before = ops.options()
    forced = ops.LaunchConfig(16, 16, 1, 1, rows=4)
    with pytest.raises(RuntimeError, match="inside"):
        with ops.override(fast_exp2=False, configs={"forward": forced}) as inside:
            assert ops.options() is inside and not inside.fast_exp2
            assert ops.launch_config("forward", 64, 32, torch.float16, GPU) == forced
            assert ops.launch_config("dq", 64, 32, torch.float16, GPU) != forced  # only the named kernel
            raise RuntimeError("inside")
    assert ops.options() is before and before.fast_exp2


def test_a_forced_config_with_rows_a_kernel_does_not_take_is_an_error_too():
    with ops.override(configs={"forward": ops.LaunchConfig(16, 16, 1, 1, rows=3)}):
        with pytest.raises(ValueError, match="forward kernel takes 1 or 2 or 4 rows"):
            ops.launch_config("forward", 64, 32, torch.float16, GPU)


def test_rows_per_program_outside_what_a_kernel_takes_is_an_error():
    wrong = tuning.Entry(ops.LaunchConfig(64, 64, 4, 3, rows=3), "a config no kernel takes")
    key = ("dq", "16-32", "16-bit")
    saved = tuning.TABLE[key]
    tuning.TABLE[key] = wrong
    try:
        with pytest.raises(ValueError, match="dq kernel takes 1 or 2 rows"):
            ops.launch_config("dq", 64, 32, torch.float16, GPU)
    finally:
        tuning.TABLE[key] = saved


def test_launch_plans_follow_the_options():
    """A plan is cached per call signature and options: a different option builds a different plan, and so do
    other output strides (the heads-last output, ops.launch_forward), which the kernel's arguments carry."""
    qkv = (4096, 4096, 256, 16, 1)
    signature = ((1, 1, 16, 16, 16), qkv, qkv, qkv, qkv, (256, 256, 16, 1), (0, 0, 0), False, False, torch.float16,
                 torch.device("cpu"), 0.25)
    heads_last = (*signature[:4], (4096, 16, 256, 16, 1), *signature[5:])
    with set_wrap_triton_enabled(False):
        plan = ops._plan(ops._forward_plan, *signature)
        assert ops._plan(ops._forward_plan, *signature) is plan  # cached
        other_out = ops._plan(ops._forward_plan, *heads_last)
        assert other_out is not plan and other_out.scalars != plan.scalars
        with ops.override(fast_exp2=False, configs={"forward": ops.LaunchConfig(16, 16, 1, 1, rows=4)}):
            other = ops._plan(ops._forward_plan, *signature)
    assert other is not plan and other.grid[1] == 4 and plan.grid[1] == 8  # 16 rows: 4 or 2 per program
