"""Scaling benchmark of flash_tt_attn.distributed.attention (rows i split over the ranks), under torchrun.

    torchrun --standalone --nproc-per-node 4 experiments/tools/distributed_scaling.py \\
        experiments/distributed/distributed-scaling.yaml [--logs-dir experiments/logs] [--force] [--dry-run]

One run measures every point of the spec at the world size torchrun gives it (NCCL on CUDA, one
GPU per rank; gloo on CPU, for a smoke test). Each rank builds only its own block of rows
(``row_block``) and the whole bias. Per repetition, all ranks leave a barrier together and each
times one call (CUDA events; ``perf_counter`` on CPU): a forward under ``no_grad`` (``fwd``) or
a forward plus ``backward`` with a fixed dO, whose bias gradient is all-reduced (``fwd_bwd``).

Rank 0 appends one JSONL row per (point, rank) to ``<logs-dir>/<gpu slug>/<spec id>.jsonl``,
flushed and fsync'd per row, with the fields of shared/CONVENTIONS.md (``ms`` etc. are this
rank's quantiles; ``peak_mem_mb`` this rank's peak above its inputs, as in flash_tt_attn.bench)
plus ``world_size``, ``rank``, ``L_local``, ``check`` and ``ms_step``/``ms_step_p20``/
``ms_step_p80``, the quantiles over repetitions of the slowest rank's time. Points already in the
log (status ok, oom or unsupported, at this world size) are skipped unless ``--force``.

A failure on one rank (e.g. out of memory) is caught, shared with all ranks after each phase
(forward, then backward) and logged as that point's status on every rank. A rank that fails
inside the backward before its all-reduce leaves the others waiting in that collective; the
group's timeout (``--timeout-s``) then ends the run, and a rerun resumes after the last point.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flash_tt_attn.bench.env import environment, gpu_slug, timestamp
from flash_tt_attn.bench.logs import append_row, read_rows, repair_tail
from flash_tt_attn.distributed import attention, row_block

QUANTILES = (0.5, 0.2, 0.8)
MB = 2**20
DONE_STATUSES = ("ok", "oom", "unsupported")
KEY_FIELDS = ("spec", "provider", "B", "H", "L", "D", "dtype", "mode", "world_size", "check")
SWEEP_AXES = ("B", "H", "D", "L", "dtype", "mode", "check")
DTYPES = ("float16", "bfloat16", "float32")
MODES = ("fwd", "fwd_bwd")


class SpecError(ValueError):
    pass


def load_spec(path: str) -> dict:
    """Read and check the spec; every problem names the file and the field."""
    import yaml  # noqa: PLC0415

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: not a mapping")
    known = {"id", "description", "provider", "world_sizes", "timing", "sweeps"}
    if set(data) - known:
        raise SpecError(f"{path}: unknown fields {sorted(set(data) - known)}")
    for name in ("id", "provider", "sweeps"):
        if name not in data:
            raise SpecError(f"{path}: missing field {name!r}")
    if data["id"] != Path(path).stem:
        raise SpecError(f"{path}: id {data['id']!r} must equal the file's stem {Path(path).stem!r}")
    timing = data.get("timing", {})
    if set(timing) - {"warmup_ms", "rep_ms"}:
        raise SpecError(f"{path}: timing: unknown fields {sorted(set(timing) - {'warmup_ms', 'rep_ms'})}")
    for i, sw in enumerate(data["sweeps"]):
        if not isinstance(sw, dict) or set(sw) != set(SWEEP_AXES):
            raise SpecError(f"{path}: sweeps[{i}] must have exactly the axes {SWEEP_AXES}")
        for axis, values in sw.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"{path}: sweeps[{i}].{axis} must be a non-empty list")
        if set(sw["dtype"]) - set(DTYPES) or set(sw["mode"]) - set(MODES):
            raise SpecError(f"{path}: sweeps[{i}]: dtype must be in {DTYPES}, mode in {MODES}")
        if any(not isinstance(c, bool) for c in sw["check"]):
            raise SpecError(f"{path}: sweeps[{i}].check must hold true/false")
    return data


def points(spec: dict, world_size: int) -> list[dict]:
    """Every point of every sweep, in order, without repeats."""
    seen, out = set(), []
    for sw in spec["sweeps"]:
        for dtype, mode, check, B, H, D, L in itertools.product(
                sw["dtype"], sw["mode"], sw["check"], sw["B"], sw["H"], sw["D"], sw["L"]):
            p = {"spec": spec["id"], "provider": spec["provider"], "B": B, "H": H, "L": L, "D": D,
                 "dtype": dtype, "mode": mode, "world_size": world_size, "check": check}
            key = tuple(p[f] for f in KEY_FIELDS)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times, dtype=torch.float64)
    return tuple(float(x) for x in t.quantile(torch.tensor(QUANTILES, dtype=torch.float64)))


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + " [...]"


def _status_of(e: BaseException) -> str:
    return "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"


class _Failed(Exception):
    def __init__(self, status, error):
        super().__init__(error)
        self.status, self.error = status, error


def _agree(device, local: tuple[str, str] | None) -> None:
    """Share each rank's failure (or None) after a phase; raise _Failed on every rank if any failed."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, local)
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if bad:
        r, (status, error) = bad[0]
        if local is not None:
            status, error = local
        else:
            error = f"rank {r} failed: {error}"
        raise _Failed(status, error)


class Point:
    """This rank's inputs of one point, and its timed call."""

    def __init__(self, p: dict, device: torch.device):
        rank = dist.get_rank()
        dtype = getattr(torch, p["dtype"])
        B, H, L, D = p["B"], p["H"], p["L"], p["D"]
        rows = row_block(L)
        self.L_local = rows.stop - rows.start
        self.check = p["check"]
        self.train = p["mode"] == "fwd_bwd"
        g = torch.Generator(device).manual_seed(1000 + rank)
        shape = (B, H, self.L_local, L, D)
        self.q, self.k, self.v = (torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(self.train)
                                  for _ in range(3))
        gb = torch.Generator(device).manual_seed(0)  # the replicated bias: the same on every rank
        self.bias = torch.randn((B, H, L, L), device=device, dtype=dtype, generator=gb).requires_grad_(self.train)
        self.dout = torch.randn(shape, device=device, dtype=dtype, generator=g) if self.train else None
        self.leaves = (self.q, self.k, self.v, self.bias)

    def clear(self):
        for t in self.leaves:
            t.grad = None

    def forward(self):
        if self.train:
            return attention(self.q, self.k, self.v, self.bias, check=self.check)
        with torch.no_grad():
            return attention(self.q, self.k, self.v, self.bias, check=self.check)

    def backward(self, out):
        if self.train:
            out.backward(self.dout)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phased_call(pt: Point, device) -> None:
    """One call, a failure on any rank shared after the forward and after the backward."""
    out, failure = None, None
    try:
        out = pt.forward()
        _sync(device)
    except Exception as e:  # noqa: BLE001
        failure = (_status_of(e), _short(e))
    _agree(device, failure)
    try:
        pt.backward(out)
        _sync(device)
    except Exception as e:  # noqa: BLE001
        failure = (_status_of(e), _short(e))
    del out
    pt.clear()
    _agree(device, failure)


def _timed(pt: Point, device) -> float:
    """One call's time in ms on this rank; all ranks start it together."""
    pt.clear()
    dist.barrier()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pt.backward(pt.forward())
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    pt.backward(pt.forward())
    return (time.perf_counter() - t0) * 1e3


def measure(p: dict, device, warmup_ms: float, rep_ms: float) -> dict:
    pt, failure = None, None
    try:
        pt = Point(p, device)
    except Exception as e:  # noqa: BLE001
        failure = (_status_of(e), _short(e))
    _agree(device, failure)
    values = {}
    _phased_call(pt, device)  # warm-up (compilation), failures shared phase by phase
    first = torch.tensor([max(_timed(pt, device), 1e-3)], dtype=torch.float64, device=_coll_device(device))
    dist.all_reduce(first, op=dist.ReduceOp.MAX)  # every rank must run the same number of repetitions
    first = float(first.item())
    for _ in range(min(100, int(warmup_ms / first))):
        _timed(pt, device)
    n = max(5, min(1000, int(rep_ms / first)))
    times = torch.tensor([_timed(pt, device) for _ in range(n)], dtype=torch.float64, device=_coll_device(device))
    everyone = [torch.empty_like(times) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, times)
    step = torch.stack(everyone).amax(dim=0).tolist()
    values.update(zip(("ms", "ms_p20", "ms_p80"), _quantiles(times.tolist()), strict=True))
    values.update(zip(("ms_step", "ms_step_p20", "ms_step_p80"), _quantiles(step), strict=True))

    values["peak_mem_mb"] = None
    if device.type == "cuda":
        pt.clear()
        dist.barrier()
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = pt.forward()
        pt.backward(out)
        _sync(device)
        values["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
        del out
        pt.clear()
    return values


def _coll_device(device):
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("spec", help="path of the spec, e.g. experiments/distributed/distributed-scaling.yaml")
    ap.add_argument("--logs-dir", default="experiments/logs")
    ap.add_argument("--force", action="store_true", help="measure points the log already holds")
    ap.add_argument("--dry-run", action="store_true", help="list the points (todo/done) and measure nothing")
    ap.add_argument("--timeout-s", type=float, default=600, help="the process group's collective timeout")
    args = ap.parse_args(argv)

    spec = load_spec(args.spec)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        return _run(spec, args)
    finally:
        dist.destroy_process_group()


def _run(spec, args) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    path = Path(args.logs_dir) / gpu_slug(env["gpu"]) / f"{spec['id']}.jsonl"
    pts = points(spec, world)
    todo = [None]
    if rank == 0:
        done = set()
        if not args.force:
            done = {tuple(r.get(f) for f in KEY_FIELDS) for r in read_rows(path)
                    if r.get("status") in DONE_STATUSES and r.get("rank") == 0}
        todo[0] = [p for p in pts if tuple(p[f] for f in KEY_FIELDS) not in done]
        print(f"{spec['id']} at world size {world} -> {path}: {len(todo[0])} to measure, "
              f"{len(pts) - len(todo[0])} done", file=sys.stderr)
        if args.dry_run:
            for p in pts:
                print(f"{p}\t{'todo' if p in todo[0] else 'done'}")
    dist.broadcast_object_list(todo, src=0)
    if args.dry_run or not todo[0]:
        return 0
    timing = spec.get("timing", {})
    warmup_ms, rep_ms = float(timing.get("warmup_ms", 25)), float(timing.get("rep_ms", 100))

    f = None
    if rank == 0:
        repair_tail(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
    try:
        for p in todo[0]:
            status, error, values = "ok", None, {}
            try:
                values = measure(p, device, warmup_ms, rep_ms)
            except _Failed as e:
                status, error = e.status, e.error
            bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                status, error, values = "error", f"non-finite result: {', '.join(bad)}", {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row = {**p, "status": status, "ms": None, "ms_p20": None, "ms_p80": None, "peak_mem_mb": None,
                   **env, "rank": rank, "L_local": row_block(p["L"]).stop - row_block(p["L"]).start,
                   "ms_step": None, "ms_step_p20": None, "ms_step_p80": None, "device": device.type}
            row.update(values)
            if error is not None:
                row["error"] = error
            row["timestamp"] = timestamp()
            rows = [None] * world
            dist.all_gather_object(rows, row)
            if rank == 0:
                for r in rows:
                    append_row(f, r)
                label = "B{B}-H{H}-L{L}-D{D}-{dtype}-{mode}-check{check}".format(**p)
                print(f"{spec['id']}: world {world}: {label}: {status}"
                      + (f" step {row['ms_step']:.3f} ms" if status == "ok" else f" ({error})"), file=sys.stderr)
    finally:
        if f is not None:
            f.close()
    return len(todo[0])


if __name__ == "__main__":
    main()
