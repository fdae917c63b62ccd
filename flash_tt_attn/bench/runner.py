"""The ``run`` command: measure every point of the given specs that the log does not hold yet.

Resume rule: a point is done when its log holds a row with the same key (:data:`spec.KEY_FIELDS`),
measured at the same git commit as this run (rows of older code stay in the log but measure nothing
for the current one: a rerun after a commit reproduces every point), with status ``ok``, ``oom`` or
``unsupported``, and an ``ok`` row holds the fields of every metric the spec asks for (a metric added
to a spec measures its points again; the newest row wins). Points whose
rows say ``error`` are measured again on every run (errors are usually bugs that get fixed; the newest
row wins in the figures). ``--force`` measures every point again (new rows are appended; nothing is
ever deleted but a torn last line). ``--only FIELD=VALUE[,VALUE...]`` (repeatable) measures only the points
whose fields match every such filter, e.g. ``--only B=2`` for one sweep of a spec; a later run without it
measures the rest (the resume rule is the same).

Each point ends as one row: ``ok``; ``oom`` (``torch.cuda.OutOfMemoryError``: memory is freed and the
sweep goes on); ``unsupported`` (provider missing here, e.g. trifast not installed or no CUDA);
``error`` (any other exception, message in ``error``; the sweep goes on).
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import torch

from .env import environment, gpu_slug, timestamp
from .logs import append_row, read_rows, repair_tail
from .measure import measure
from .providers import Unsupported
from .spec import KEY_FIELDS, METRIC_FIELDS, Point, Spec, load_spec, resolve_spec, row_key

DONE_STATUSES = ("ok", "oom", "unsupported")
_MEASURED = ("ms", "ms_p20", "ms_p80", "peak_mem_mb")


def log_path(logs_dir, slug: str, spec_id: str) -> Path:
    """``<logs_dir>/<gpu slug>/<spec id>.jsonl``."""
    return Path(logs_dir) / slug / f"{spec_id}.jsonl"


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + " [...]"


def _free(device: torch.device, collect: bool) -> None:
    if collect:  # after a failure: drop what the exception's frames held (gc is slow; skip it otherwise)
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(spec: Spec, point: Point, device: torch.device, env: dict) -> dict:
    """Measure one point and return its complete log row (never raises for a provider's failure)."""
    row = {**{k: v for k, v in point.fields().items() if k not in ("op", "c_in", "node")},
           "status": "ok", **dict.fromkeys(_MEASURED), **env, "timestamp": None,
           "op": point.op, "device": device.type}
    if point.c_in is not None:
        row["c_in"] = point.c_in
    if point.node is not None:
        row["node"] = point.node
    for m in ("host", "graph"):  # the newer metrics' fields only in rows of specs that ask for them
        if m in spec.metrics:
            row.update(dict.fromkeys(METRIC_FIELDS[m]))
    status, error, values = "ok", None, {}
    try:
        values = measure(point, spec.metrics, device, spec.warmup_ms, spec.rep_ms)
    except Unsupported as e:
        status, error = "unsupported", str(e)
    except torch.cuda.OutOfMemoryError as e:
        status, error = "oom", str(e).splitlines()[0] if str(e) else "out of memory"
    except Exception as e:  # noqa: BLE001 (any provider failure becomes a row; the sweep goes on)
        status, error = "error", _short(e)
    _free(device, collect=status != "ok")
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        status, error, values = "error", f"non-finite result: {', '.join(bad)}", {}
    row.update(values)
    row["status"] = status
    if error is not None:
        row["error"] = error
    row["timestamp"] = timestamp()
    return row


def _progress(items, desc: str):
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return None
    return tqdm(items, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True)


def is_done(row: dict, spec: Spec) -> bool:
    """Whether ``row`` settles its point for ``spec`` (the module docstring's resume rule)."""
    status = row.get("status")
    if status not in DONE_STATUSES:
        return False
    return status != "ok" or all(METRIC_FIELDS[m][0] in row for m in spec.metrics)


def todo_points(spec: Spec, path: Path, force: bool = False,
                commit: str | None = None) -> tuple[list[Point], list[Point]]:
    """(todo, done): the spec's points split by whether ``path`` already holds a done row for them, measured
    at git commit ``commit`` (the run's ``git_sha``)."""
    done_keys = {row_key(r) for r in read_rows(path) if is_done(r, spec) and r.get("git_sha") == commit}
    pts = spec.points()
    if force:
        return pts, []
    return [p for p in pts if p.key() not in done_keys], [p for p in pts if p.key() in done_keys]


def parse_only(filters) -> dict[str, set[str]]:
    """``["B=2", "L=1024,2048"]`` -> ``{"B": {"2"}, "L": {"1024", "2048"}}`` (--only); a field a point does not
    have, or a filter without ``=`` or values, is a ValueError naming the fields there are."""
    fields = [name for name in KEY_FIELDS if name != "spec"]
    only: dict[str, set[str]] = {}
    for text in filters or ():
        name, sep, values = text.partition("=")
        name = name.strip()
        if not sep or not values.strip() or name not in fields:
            raise ValueError(f"--only {text!r}: expected FIELD=VALUE[,VALUE...] with FIELD one of {', '.join(fields)}")
        only.setdefault(name, set()).update(v.strip() for v in values.split(","))
    return only


def _matches(point: Point, only: dict[str, set[str]]) -> bool:
    return all(str(getattr(point, name)) in values for name, values in only.items())


def run_specs(names, specs_dir="experiments", logs_dir="experiments/logs", device=None, force=False,
              dry_run=False, out=None, only=None) -> int:
    """Validate every named spec, then measure each one's missing points; return the number of
    points measured. With ``dry_run`` only list the points (``todo``/``done``) and measure nothing.
    ``only`` (``--only``'s ``FIELD=VALUES`` strings, :func:`parse_only`) keeps the points that match every
    filter; a filter that matches none of a spec's points is an error before anything runs."""
    specs = [load_spec(resolve_spec(n, specs_dir)) for n in names]  # all validated before anything runs
    only = parse_only(only)
    for spec in specs:
        if only and not any(_matches(p, only) for p in spec.points()):
            shown = " ".join(f"{name}={','.join(sorted(values))}" for name, values in only.items())
            raise ValueError(f"--only {shown}: no point of spec {spec.id!r} matches")
    out = sys.stdout if out is None else out
    device = pick_device(device)
    env = environment(device)
    slug = gpu_slug(env["gpu"])
    measured = 0
    for spec in specs:
        path = log_path(logs_dir, slug, spec.id)
        if not dry_run:
            repair_tail(path)
        todo, done = todo_points(spec, path, force, env["git_sha"])
        if only:
            todo, done = [p for p in todo if _matches(p, only)], [p for p in done if _matches(p, only)]
        if dry_run:
            print(f"# {spec.id} -> {path}: {len(todo)} to measure, {len(done)} done", file=out)
            todo_keys = {p.key() for p in todo}
            for p in spec.points():
                if _matches(p, only):
                    print(f"{spec.id}\t{p.label()}\t{'todo' if p.key() in todo_keys else 'done'}", file=out)
            continue
        if not todo:
            which = " matching --only" if only else ""
            print(f"{spec.id}: all {len(done)} points{which} already in {path} at this commit", file=sys.stderr)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        bar = _progress(todo, spec.id)
        with open(path, "a", encoding="utf-8", newline="\n") as f:
            for point in bar if bar is not None else todo:
                if bar is not None:
                    bar.set_postfix_str(point.label(), refresh=False)
                row = measure_row(spec, point, device, env)
                append_row(f, row)
                measured += 1
                if bar is None:
                    print(f"{spec.id}: {point.label()}: {row['status']}", file=sys.stderr)
        if bar is not None:
            bar.close()
    return measured
