"""Tables and figures from logs: byte-identical when regenerated, newest row per point, README index.

All logs here are fabricated inside tmp dirs; the committed logs are never read or written.
"""

import json
import shutil
from pathlib import Path

import pytest

for mod in ("yaml", "pandas", "seaborn", "matplotlib"):
    pytest.importorskip(mod)

from flash_tt_attn.bench.build import build  # noqa: E402
from flash_tt_attn.bench.spec import load_spec  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
GPU = "NVIDIA Test GPU 80GB"
SLUG = "nvidia-test-gpu-80gb"


def fake_rows(spec, ts="2026-01-01T00:00:00.000000+00:00"):
    """Plausible rows for every point of ``spec``: naive runs out of memory at the largest L."""
    rows = []
    biggest = max(p.L for p in spec.points())
    for p in spec.points():
        scale = {"flash_tt_attn": 1.0, "naive": 8.0, "sdpa": 3.0, "flex": 1.5, "trifast": 2.0, "cueq": 2.5,
                 "flex_plain": 1.2, "sdpa_cudnn_plain": 1.1}
        ms = scale[p.provider] * (p.L / 128) ** 3 * (2.5 if p.mode == "fwd_bwd" else 1.0)
        row = {**p.fields(), "status": "ok", "ms": ms, "ms_p20": ms * 0.98, "ms_p80": ms * 1.03,
               "peak_mem_mb": scale[p.provider] * p.L ** 2 / 1000, "gpu": GPU, "driver": "1.0", "cuda": "13.0",
               "torch": "2.11.0", "triton": "3.6.0", "git_sha": "0" * 40, "dirty": False, "timestamp": ts}
        if "error" in spec.metrics:
            row.update(ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None,
                       **{f"err_{n}": 1e-4 * (i + 1) for i, n in enumerate(("o", "dq", "dk", "dv", "dbias"))})
        if p.provider == "naive" and p.L == biggest and "error" not in spec.metrics:
            row.update(status="oom", ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None, error="CUDA out of memory")
        if p.provider == "trifast":
            row.update(status="unsupported", ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None,
                       error="trifast not importable")
        rows.append(row)
    return rows


@pytest.fixture
def workspace(tmp_path):
    """A temp copy of the shipped specs with fabricated logs for three of them."""
    specs = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, specs, ignore=shutil.ignore_patterns("logs", "scripts"))
    logs = specs / "logs" / SLUG
    logs.mkdir(parents=True)
    for spec_id in ("seed-fwd", "block", "correctness", "ceilings"):
        spec = load_spec(specs / f"{spec_id}.yaml")
        rows = fake_rows(spec)
        if spec_id == "seed-fwd":  # an older row for one point, which must lose to the newer one
            old = dict(rows[0], ms=999.0, timestamp="2025-01-01T00:00:00.000000+00:00")
            rows.append(old)
        (logs / f"{spec_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return specs


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_figures_are_byte_identical_and_indexed(workspace):
    logs = workspace / "logs"
    out1, out2 = workspace.parent / "out1", workspace.parent / "out2"
    build(workspace, logs, out1)
    build(workspace, logs, out2)
    a, b = snapshot(out1), snapshot(out2)
    assert a == b
    assert f"{SLUG}/fused-attention-batch4-head8-d32-fwd-latency.png" in a
    assert f"{SLUG}/fused-attention-batch4-head8-d32-fwd-memory.png" in a
    assert f"{SLUG}/triangle-block-c128-head4-d32-bf16-fwd_bwd-latency.png" in a
    assert f"{SLUG}/correctness.md" in a and f"{SLUG}/seed-fwd-speedup.csv" in a
    assert f"{SLUG}/ceilings-batch1-head4-d32-bf16-fwd_bwd-latency.png" in a  # eight providers' styles, dashed ones
    assert "| flex_plain ms | vs flex_plain |" in a[f"{SLUG}/ceilings-speedup.md"].decode()
    png = a[f"{SLUG}/fused-attention-batch4-head8-d32-fwd-latency.png"]
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"Matplotlib" not in png

    readme = a["README.md"].decode()
    for name in a:
        if name != "README.md":
            assert f"]({name})" in readme, name
    assert "seed-fwd.jsonl" in readme and GPU in readme
    assert "`alphafold`" in readme  # listed as not measured yet


def test_tables_use_the_newest_row_and_name_the_gpu(workspace):
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    csv = (out / SLUG / "seed-fwd.csv").read_text()
    assert "999" not in csv  # the older duplicate row lost
    md = (out / SLUG / "seed-fwd.md").read_text()
    assert GPU in md and "| oom |" in md and "n/a" in md
    errors = (out / SLUG / "correctness.md").read_text()
    assert "1.00e-04" in errors and "float16" in errors
