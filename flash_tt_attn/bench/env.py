"""Provenance of a log row: GPU, driver, library versions, git commit; and the GPU's folder slug."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

# Paths the pipeline itself writes; changes there do not make the measured code "dirty".
_OUTPUT_PATHS = ("experiments/logs", "paper_figures")


def _run(cmd: list[str], cwd=None) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout. A copy of the tree (e.g. shipped to a remote GPU) states them in
    FLASH_TT_ATTN_GIT_SHA and FLASH_TT_ATTN_GIT_DIRTY (0/1), set by whoever made the copy; a stated commit
    wins over git, because such a copy may carry a stale .git of its own."""
    stated = os.environ.get("FLASH_TT_ATTN_GIT_SHA")
    if stated:
        dirty = os.environ.get("FLASH_TT_ATTN_GIT_DIRTY")
        return stated, (None if dirty is None else dirty == "1")
    root = Path(__file__).resolve().parents[2]
    sha = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if sha is None:
        return None, None
    excludes = [f":(exclude){p}" for p in _OUTPUT_PATHS]
    status = _run(["git", "status", "--porcelain", "--", ".", *excludes], cwd=root)
    return sha.strip(), (None if status is None else bool(status.strip()))


def _driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def environment(device: torch.device) -> dict:
    """The provenance fields of every row measured on ``device`` (``gpu`` is ``cpu`` off CUDA).

    ``dirty`` is True when the working tree differs from ``git_sha`` outside the pipeline's own
    outputs (experiments/logs, paper_figures); untracked files count.
    """
    import triton  # noqa: PLC0415

    sha, dirty = _git_state()
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": sha,
        "dirty": dirty,
    }


def gpu_slug(gpu_name: str) -> str:
    """Folder name for a device: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "unknown"


def timestamp() -> str:
    """Now, UTC, ISO 8601 with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
