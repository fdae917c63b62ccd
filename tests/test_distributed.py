"""flash_tt_attn.distributed.attention: rows split over ranks equal the single-process result.

The CPU tests start 2 and 3 processes with gloo (torch.multiprocessing, a file store) and
run every case inside one group per world size, so a test pays the start-up once. Each
rank builds the same full tensors from one seed, runs flash_tt_attn.attention() on them
and compares its block of rows of the output, q/k/v gradients, and the full bias gradient.
Hangs cannot happen silently: the group has a short timeout and the parent kills the
workers after a deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from flash_tt_attn import attention
from flash_tt_attn.distributed import attention as dist_attention
from flash_tt_attn.distributed import row_block

DEADLINE_S = 120  # whole spawned test, start-up included; far above the few seconds it takes
GROUP_TIMEOUT_S = 30  # a collective that waits longer than this raises instead of hanging


# ---------------------------------------------------------------- helpers run inside workers


def _full_inputs(B, H, L, D, dtype, with_mask, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, L, D, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(B, H, L, L, generator=g, dtype=dtype)
    mask = None
    if with_mask:
        mask = torch.rand(B, L, L, generator=g) > 0.3
        mask[:, 0] = False  # a fully masked row: output and gradients 0
    dout = torch.randn(B, H, L, L, D, generator=g, dtype=dtype)
    return q, k, v, bias, mask, dout


def _grads(fn, q, k, v, bias, mask, dout, scale):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = fn(*leaves, scale, mask)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def _close(name, got, want, rtol):
    err = (got.double() - want.double()).norm().item()
    ref = want.double().norm().item()
    assert err <= rtol * max(ref, 1e-30), f"{name}: relative error {err / max(ref, 1e-30):.3g} > {rtol:.1g}"


def _local_run(group, case, expected):
    """This rank's block of rows through distributed.attention, compared with the one-process result."""
    B, H, L, D, dtype, with_mask, scale, seed = case
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, bias, mask, dout = _full_inputs(B, H, L, D, dtype, with_mask, seed)
    want_out, want_dq, want_dk, want_dv, want_db = expected[case]

    rows = row_block(L, group)
    local = [t[:, :, rows].contiguous() for t in (q, k, v)]
    lmask = None if mask is None else mask[:, rows].contiguous()
    out, (dq, dk, dv, db) = _grads(lambda q_, k_, v_, b_, s, m: dist_attention(q_, k_, v_, b_, s, m, group=group),
                                   *local, bias, lmask, dout[:, :, rows].contiguous(), scale)
    assert out.shape == (B, H, rows.stop - rows.start, L, D) and out.dtype == dtype
    # Rows are computed exactly as in one process; the bias gradient differs by the order of its sum.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(f"rank {rank}/{world} out", out, want_out[:, :, rows], rtol)
    _close(f"rank {rank}/{world} dq", dq, want_dq[:, :, rows], rtol)
    _close(f"rank {rank}/{world} dk", dk, want_dk[:, :, rows], rtol)
    _close(f"rank {rank}/{world} dv", dv, want_dv[:, :, rows], rtol)
    _close(f"rank {rank}/{world} dbias", db, want_db, rtol)


def _expect_error_everywhere(group, fn, *fragments):
    """fn must raise ValueError on this rank, with every fragment in the message."""
    try:
        fn()
    except ValueError as err:
        for frag in fragments:
            assert frag in str(err), f"rank {dist.get_rank(group)}: {frag!r} not in {str(err)!r}"
        return str(err)
    raise AssertionError(f"rank {dist.get_rank(group)}: no ValueError")


# (B, H, L, D, dtype, mask, scale, seed): even and uneven splits (L = 7 over 3 ranks: 3, 2, 2;
# L = 2 over 3 ranks: 1, 1, 0, a rank without rows), masks with a fully masked row, fp32 and fp64.
CASES = [
    (1, 2, 6, 16, torch.float64, True, None, 1),
    (2, 1, 7, 16, torch.float32, True, 0.3, 2),
    (1, 1, 5, 16, torch.float32, False, None, 3),
    (1, 1, 2, 16, torch.float64, True, None, 4),
]


def _expected():
    """The single-process attention() result (output and the four gradients) of every case."""
    result = {}
    for case in CASES:
        B, H, L, D, dtype, with_mask, scale, seed = case
        q, k, v, bias, mask, dout = _full_inputs(B, H, L, D, dtype, with_mask, seed)
        out, grads = _grads(attention, q, k, v, bias, mask, dout, scale)
        result[case] = (out, *grads)
    return result


def _cases(group, expected):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for case in CASES:
        _local_run(group, case, expected)

    # A bias that needs no gradient: no all-reduce, and the same output.
    case = CASES[1]
    B, H, L, D, dtype, with_mask, scale, seed = case
    q, k, v, bias, mask, dout = _full_inputs(B, H, L, D, dtype, with_mask, seed)
    rows = row_block(L, group)
    out = dist_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], bias, scale, mask[:, rows], group=group)
    _close("output without bias grad", out, expected[case][0][:, :, rows], 1e-5)

    # The replicated bias's gradient is summed over the ranks once per call: two calls, twice the gradient.
    lq = q[:, :, rows].clone().requires_grad_(True)
    lb = bias.clone().requires_grad_(True)
    two = [dist_attention(lq, k[:, :, rows], v[:, :, rows], lb, scale, mask[:, rows], group=group) for _ in "ab"]
    torch.autograd.backward(two, [dout[:, :, rows]] * 2)
    _close("bias grad over two calls", lb.grad, 2 * expected[case][4], 1e-5)

    # Mismatches between ranks: the same ValueError on every rank, no hang.
    x = torch.randn(1, 1, 4, 4, 16)
    xb = torch.randn(1, 1, 4, 4)
    blk = row_block(4, group)
    part = x[:, :, blk]

    msgs = []
    # D differs between ranks (each rank's inputs are valid by themselves).
    d = 16 if rank == 0 else 32
    y = torch.randn(1, 1, blk.stop - blk.start, 4, d)
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(y, y, y, xb, group=group),
                                         "do not fit together", "B, H, L and D must be the same"))
    # Blocks that do not add up to L (every rank passes all L rows).
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(x, x, x, xb, group=group),
                                         "must add up to L = 4"))
    # One rank passes a mask, the others do not.
    m = torch.ones(1, blk.stop - blk.start, 4, dtype=torch.bool) if rank == world - 1 else None
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(part, part, part, xb, None, m, group=group),
                                         "mask must be given on every rank or on none"))
    # Scales differ.
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(part, part, part, xb, 0.1 * (rank + 1),
                                                                       group=group),
                                         "scale must be the same on every rank"))
    # Only one rank's bias requires grad: its backward would wait for the others' all-reduce.
    b = xb.clone().requires_grad_(rank == 0)
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(part, part, part, b, group=group),
                                         "bias must require grad"))
    # One rank's own inputs are invalid (wrong dtype on the last rank, wrong bias shape on rank 0).
    bad = part.double() if rank == world - 1 else part
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(bad, part, part, xb, group=group),
                                         f"invalid inputs on rank {world - 1} of {world}", "k has dtype"))
    bb = xb[..., :3] if rank == 0 else xb
    msgs.append(_expect_error_everywhere(group, lambda: dist_attention(part, part, part, bb, group=group),
                                         f"invalid inputs on rank 0 of {world}", "bias must have shape"))
    # Every rank raised the same messages, except for the "this is rank r" remark.
    gathered = [None] * world
    dist.all_gather_object(gathered, [mm.replace(f"(this is rank {rank})", "") for mm in msgs], group=group)
    assert all(g == gathered[0] for g in gathered), gathered

    # The group still works after the errors (no collective was left half done).
    _local_run(group, CASES[2], expected)


@contextlib.contextmanager
def _reported(rank, result_dir):
    """A worker's body: leaves ok-<rank> or error-<rank> (its traceback) for _spawn, and always tears the
    process group down.

    A rank that passed leaves with os._exit(0), skipping the interpreter's finalization: there, about
    once in 20 runs on 2 CPU cores, a thread of torch's gloo backend is destroyed while still joinable
    and the process aborts ("terminate called without an active exception", SIGABRT, no Python frame
    left), after every rank has written ok-<rank> and destroyed its group. That is torch's teardown,
    not this library's code, and it must not turn a passing test red.
    """
    try:
        yield
        dist.barrier()
        open(os.path.join(result_dir, f"ok-{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(result_dir, f"error-{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world, init_file, result_dir):
    with _reported(rank, result_dir):
        expected = torch.load(os.path.join(result_dir, "..", "expected.pt"))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        torch.manual_seed(0)
        _cases(None, expected)


def _spawn(world, tmp_path, worker=_worker):
    """Run worker on `world` processes; fail with every rank's traceback, kill them after DEADLINE_S."""
    ctx = mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed test did not finish in {DEADLINE_S} s (hang?)")
    except ProcessException as err:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error-*")))
        pytest.fail(f"a rank failed: {err}\n{errors}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == [f"ok-{r}" for r in range(world)]


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def expected_file(tmp_path_factory):
    """The single-process results, computed once here instead of on every rank."""
    path = tmp_path_factory.mktemp("distributed") / "expected.pt"
    torch.save(_expected(), path)
    return path


@pytest.mark.parametrize("world", [pytest.param(2, id="world2"), pytest.param(3, id="world3")])
def test_rows_split_over_gloo_ranks_match_one_process(world, expected_file):
    run_dir = expected_file.parent / f"world{world}"
    run_dir.mkdir()
    _spawn(world, run_dir)


@pytest.mark.parametrize("L,world", [(7, 3), (6, 2), (2, 3), (1, 1), (100, 8)])
def test_row_block_splits_evenly(L, world):
    blocks = [row_block(L, rank=r, world_size=world) for r in range(world)]
    assert blocks[0].start == 0 and blocks[-1].stop == L
    assert all(a.stop == b.start for a, b in zip(blocks[:-1], blocks[1:], strict=True))
    sizes = [b.stop - b.start for b in blocks]
    assert sizes == [t.numel() for t in torch.tensor_split(torch.arange(L), world)]
    assert max(sizes) - min(sizes) <= 1


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q = torch.randn(1, 1, 2, 2, 16)
    with pytest.raises(RuntimeError, match="not initialized"):
        dist_attention(q, q, q, torch.randn(1, 1, 2, 2))


def _gpu_worker(rank, world, init_file, result_dir):
    with _reported(rank, result_dir):
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            B, H, L, D = 1, 2, 67, 32
            q, k, v, bias, mask, dout = (None if t is None else t.cuda()
                                         for t in _full_inputs(B, H, L, D, dtype, True, seed=7))
            want_out, want_g = _grads(attention, q, k, v, bias, mask, dout, None)
            rows = row_block(L)
            out, got_g = _grads(lambda q_, k_, v_, b_, s, m: dist_attention(q_, k_, v_, b_, s, m),
                                *(t[:, :, rows].contiguous() for t in (q, k, v)), bias,
                                mask[:, rows].contiguous(), dout[:, :, rows].contiguous(), None)
            _close(f"{dtype} out", out, want_out[:, :, rows], rtol)
            for name, g, w in zip(("dq", "dk", "dv"), got_g[:3], want_g[:3], strict=True):
                _close(f"{dtype} {name}", g, w[:, :, rows], rtol)
            _close(f"{dtype} dbias", got_g[3], want_g[3], rtol)
            # An invalid input on rank 0 (a bias one column short): a ValueError on every rank, no hang.
            lq = q[:, :, rows]
            with pytest.raises(ValueError, match=f"invalid inputs on rank 0 of {world}"):
                dist_attention(lq, lq, lq, bias[..., :-1] if rank == 0 else bias)


@pytest.mark.gpu
def test_rows_split_over_nccl_ranks_match_one_process(tmp_path):
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs a CUDA GPU and NCCL")
    world = min(torch.cuda.device_count(), 2)  # one GPU: a 1-rank NCCL group still runs every collective
    _spawn(world, tmp_path, worker=_gpu_worker)

