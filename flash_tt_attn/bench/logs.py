"""Append-only JSONL logs, one row per measured point: ``experiments/logs/<gpu-slug>/<spec>.jsonl``.

Every row is written as one line ending in a newline, then flushed and fsync'd, so a killed run
leaves at most one torn line: the last one, without its newline.

* Reading (:func:`read_rows`, used by the runner and the figures) never changes a file: a line
  without its newline, or one that is not a JSON object, is reported on stderr and skipped.
* Before appending, the runner calls :func:`repair_tail`, which truncates a torn last line (bytes
  after the final newline) and reports it; the point it described is then measured again.
* :func:`newest` keeps, per point, the row with the latest ``timestamp`` (ties: the later line).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .spec import row_key

#: The one log in a GPU's folder that is not a spec's: the test suites passed there (bench/checks.py).
CHECKS_LOG = "checks"


def _warn(msg: str) -> None:
    print(f"flash_tt_attn.bench: {msg}", file=sys.stderr)


def read_rows(path) -> list[dict]:
    """Every complete, valid row of ``path`` in file order; broken lines are reported and skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                _warn(f"{path}:{lineno}: torn last line (no newline; a run was killed mid-write): skipped")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _warn(f"{path}:{lineno}: not valid JSON ({e.msg}): skipped")
                continue
            if not isinstance(row, dict):
                _warn(f"{path}:{lineno}: not a JSON object: skipped")
                continue
            rows.append(row)
    return rows


def repair_tail(path) -> bool:
    """Truncate a torn last line (anything after the final newline); return True if bytes were cut."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    _warn(f"{path}: removed a torn last line ({size - keep} bytes); its point will be measured again")
    return True


def append_row(f, row: dict) -> None:
    """Write ``row`` as one JSON line to the open file ``f``, then flush and fsync."""
    f.write(json.dumps(row, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def newest(rows: list[dict]) -> list[dict]:
    """One row per point: the newest by ``timestamp`` (ISO 8601 UTC), the later line on ties."""
    best = {}
    for i, row in enumerate(rows):
        k = row_key(row)
        rank = (str(row.get("timestamp", "")), i)
        if k not in best or rank >= best[k][0]:
            best[k] = (rank, row)
    return [row for _, row in best.values()]
