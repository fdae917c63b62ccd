"""The test suites a GPU reproduction ran and passed, per commit: ``experiments/logs/<gpu>/checks.jsonl``.

``make reproduce`` runs the GPU tests and the gradient checks before the benchmarks. Each suite that passes
in full appends one row here (``check``, the provenance fields of a benchmark row, ``timestamp``), and a
rerun of ``make reproduce`` at the same commit on the same kind of GPU skips a suite that already passed:
a reproduction split over several sessions (or machines of one kind) resumes rather than starting over,
as the benchmark runner does. A tree with uncommitted changes never skips.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .env import environment, gpu_slug, timestamp
from .logs import CHECKS_LOG, append_row, read_rows


def checks_path(logs_dir, env: dict) -> Path:
    return Path(logs_dir) / gpu_slug(env["gpu"]) / f"{CHECKS_LOG}.jsonl"


def _env() -> dict:
    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def passed(name: str, logs_dir="experiments/logs", env: dict | None = None) -> bool:
    """Whether suite ``name`` passed on this kind of GPU at this commit, with a clean tree."""
    env = _env() if env is None else env
    if env["git_sha"] is None or env["dirty"] is not False:
        return False
    return any(r.get("check") == name and r.get("git_sha") == env["git_sha"] and r.get("dirty") is False
               for r in read_rows(checks_path(logs_dir, env)))


def record(name: str, logs_dir="experiments/logs", env: dict | None = None) -> Path:
    """Append the row saying that suite ``name`` passed here, now."""
    env = _env() if env is None else env
    path = checks_path(logs_dir, env)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        append_row(f, {"check": name, **env, "timestamp": timestamp()})
    return path
