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
                 "flex_plain": 1.2, "sdpa_cudnn_plain": 1.1, "folded_split_sum": 0.97,
                 "folded_bias_copy": 0.98, "folded_launches": 0.95, "qkv_copies": 1.25,
                 "torch_layer_norm": 1.2, "fused_projections": 0.95, "flash_tt_attn_lengths": 0.6,
                 "lengths_fused_projections": 0.55, "flash_tt_attn_host_lengths": 0.58,
                 "heads_first_output": 1.04, "host_lengths_heads_first_output": 0.6}
        ms = scale[p.provider] * (p.L / 128) ** 3 * (2.5 if p.mode == "fwd_bwd" else 1.0)
        row = {**p.fields(), "status": "ok", "ms": ms, "ms_p20": ms * 0.98, "ms_p80": ms * 1.03,
               "peak_mem_mb": scale[p.provider] * p.L ** 2 / 1000, "gpu": GPU, "driver": "1.0", "cuda": "13.0",
               "torch": "2.11.0", "triton": "3.6.0", "git_sha": "0" * 40, "dirty": False, "timestamp": ts}
        if "error" in spec.metrics:
            row.update(ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None,
                       **{f"err_{n}": 1e-4 * (i + 1) for i, n in enumerate(("o", "dq", "dk", "dv", "dbias"))})
        if p.provider == "naive" and p.L == biggest and "error" not in spec.metrics:
            row.update(status="oom", ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None, error="CUDA out of memory")
        if "host" in spec.metrics:
            host = 0.05 * scale[p.provider] + (0.5 if p.mode == "fwd_bwd" else 0.1)
            row.update(host_ms=host, host_ms_p20=host * 0.95, host_ms_p80=host * 1.1, host_wall_ms=max(ms, host),
                       host_calls=50)
        if "graph" in spec.metrics:
            graph = 0.9 * ms
            row.update(graph_ms=graph, graph_ms_p20=graph * 0.99, graph_ms_p80=graph * 1.01, graph_error=None)
            if p.provider == "cueq":  # ok row whose call could not be captured
                row.update(graph_ms=None, graph_ms_p20=None, graph_ms_p80=None,
                           graph_error="RuntimeError: operation not permitted when stream is capturing")
        if p.provider == "trifast":
            row.update(status="unsupported", ms=None, ms_p20=None, ms_p80=None, peak_mem_mb=None,
                       error="trifast not importable")
            for k in ("host_ms", "host_ms_p20", "host_ms_p80", "host_wall_ms", "host_calls", "graph_ms",
                      "graph_ms_p20", "graph_ms_p80"):
                if k in row:
                    row[k] = None
        rows.append(row)
    return rows


@pytest.fixture
def workspace(tmp_path):
    """A temp copy of the shipped specs with fabricated logs for three of them."""
    specs = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, specs, ignore=shutil.ignore_patterns("logs", "scripts"))
    logs = specs / "logs" / SLUG
    logs.mkdir(parents=True)
    for spec_id in ("seed-fwd", "block", "correctness", "ceilings", "training"):
        spec = load_spec(specs / f"{spec_id}.yaml")
        rows = fake_rows(spec)
        if spec_id == "seed-fwd":  # an older row for one point, which must lose to the newer one
            old = dict(rows[0], ms=999.0, timestamp="2025-01-01T00:00:00.000000+00:00")
            rows.append(old)
        if spec_id == "block":  # the starting node's rows as written before the node axis and the new metrics
            drop = {"node", "host_ms", "host_ms_p20", "host_ms_p80", "host_wall_ms", "host_calls", "graph_ms",
                    "graph_ms_p20", "graph_ms_p80", "graph_error"}
            rows = [{k: v for k, v in r.items() if k not in drop} if r["node"] == "starting" else r for r in rows]
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
    for m in ("latency", "graph", "host"):
        assert f"{SLUG}/training-batch1-head4-d32-bf16-fwd_bwd-{m}.png" in a
    assert "table (speedup, graph)" in readme


def test_tables_use_the_newest_row_and_name_the_gpu(workspace):
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    csv = (out / SLUG / "seed-fwd.csv").read_text()
    assert "999" not in csv  # the older duplicate row lost
    md = (out / SLUG / "seed-fwd.md").read_text()
    assert GPU in md and "| oom |" in md and "n/a" in md
    errors = (out / SLUG / "correctness.md").read_text()
    assert "1.00e-04" in errors and "float16" in errors


def test_graph_and_host_tables(workspace):
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    md = (out / SLUG / "training-graph-speedup.md").read_text()
    assert "CUDA-graph replay median in ms" in md
    assert "| L | flash_tt_attn ms | flex ms | vs flex | cueq ms | vs cueq | trifast ms | vs trifast |" in md
    assert "| no graph | – |" in md and "| n/a | – |" in md  # cueq: not captured; trifast: unsupported
    assert "| 1.50× |" in md  # flex's graph time / ours (fabricated 1.5x as in eager)
    host = (out / SLUG / "training-host-speedup.csv").read_text().splitlines()
    assert host[0].startswith("B,H,D,dtype,mode,L,flash_tt_attn_host_ms,flex_host_ms,speedup_vs_flex,")
    results = (out / SLUG / "training-graph.csv").read_text().splitlines()[0].split(",")
    assert "graph_ms" in results and "graph_error" in results and "host_ms" not in results and "ms" not in results
    eager = (out / SLUG / "training.md").read_text()
    assert "latency median, ms / peak memory, MB" in eager
    assert "host time per call" in (out / SLUG / "training-host.md").read_text()


def test_block_rows_without_node_are_the_starting_node(workspace):
    """Old block rows (no node field, no host/graph fields) are the starting node's; the ending node's
    rows sit beside them and the tables gain a node column."""
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    md = (out / SLUG / "block.md").read_text()
    assert "| mode | node | L | flash_tt_attn | naive |" in md
    assert md.count("| starting |") == md.count("| ending |") == 10
    assert (out / SLUG / "triangle-block-c128-head4-d32-bf16-fwd-latency.png").exists()
    assert (out / SLUG / "triangle-block-ending-c128-head4-d32-bf16-fwd_bwd-graph.png").exists()
    assert not (out / SLUG / "triangle-block-c128-head4-d32-bf16-fwd_bwd-graph.png").exists()  # no values
    graph = (out / SLUG / "block-graph.md").read_text()
    assert "| ending |" in graph and "| starting |" in graph


REPO = Path(__file__).resolve().parents[1]


def test_committed_outputs_regenerate_byte_identically(tmp_path):
    """paper_figures/<gpu>/ is a pure function of the committed logs and specs: regenerating it gives the
    same files, byte for byte (rows from before the node axis and the host/graph metrics included).
    Fails when a log or spec changed without `python -m flash_tt_attn.bench figures` being rerun."""
    # built from a copy at the same depth, so that the relative links to logs and specs come out the same
    specs = tmp_path / "experiments"
    shutil.copytree(REPO / "experiments", specs, ignore=shutil.ignore_patterns("scripts", "tuning", "gpu-runs"))
    out = tmp_path / "paper_figures"
    build(specs, specs / "logs", out)
    committed = REPO / "paper_figures"
    for slug in sorted(p.name for p in (REPO / "experiments" / "logs").iterdir() if p.is_dir()):
        if not (committed / slug).is_dir():
            continue
        want, got = snapshot(committed / slug), snapshot(out / slug)
        assert sorted(got) == sorted(want), slug
        changed = [name for name in want if want[name] != got[name]]
        assert not changed, f"{slug}: regenerated outputs differ: {changed}"


def test_a_results_table_shows_the_providers_its_where_names(workspace):
    """block.yaml's results tables name flash_tt_attn and naive in ``where``: the variants' rows stay out of them
    (no column of dashes where they were not swept) and go to their own speedup tables."""
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    for name in ("block", "block-host", "block-graph"):
        md = (out / SLUG / f"{name}.md").read_text()
        assert "| flash_tt_attn | naive |" in md and "qkv_copies" not in md and "fused" not in md, name
    variant = (out / SLUG / "block-qkv-copies.md").read_text()
    assert "| mode | L | flash_tt_attn ms | qkv_copies ms | vs qkv_copies |" in variant
    assert "| fwd | 256 |" in variant and "| 1.25× |" in variant  # fabricated: 1.25 of flash_tt_attn's time
    norm = (out / SLUG / "block-triton-layer-norm.md").read_text()
    assert "| mode | L | flash_tt_attn ms | torch_layer_norm ms | vs torch_layer_norm |" in norm
    training = (out / SLUG / "training.md").read_text()  # no provider in where: every provider, as before
    assert "| flash_tt_attn | flex | cueq | trifast |" in training


def test_every_provider_and_variant_has_its_own_color_and_a_marker():
    """The block specs' providers (long-inference: flash_tt_attn_whole, naive_chunk4, ...) and a spec's variants
    are drawn too, each in a color of its own (the H200's first long-inference rows failed the figures)."""
    from flash_tt_attn.bench.figures import _style
    from flash_tt_attn.bench.spec import PROVIDERS

    names = list(dict.fromkeys([*PROVIDERS["attention"], *PROVIDERS["triangle_block"], "splits3"]))
    colors, markers = _style(["splits3"])
    assert set(names) <= set(colors) and set(names) <= set(markers)
    assert len({tuple(colors[n]) for n in names}) == len(names)


def test_the_checks_log_is_not_reported_as_a_stray_log(tmp_path, capsys):
    """experiments/logs/<gpu>/checks.jsonl (bench/checks.py) sits beside the spec logs; the figures leave it alone
    and say nothing of it, while a log of no spec is still reported."""
    gpu = tmp_path / "logs" / "nvidia-h200"
    gpu.mkdir(parents=True)
    (gpu / "checks.jsonl").write_text(json.dumps({"check": "gpu_tests", "git_sha": "abc"}) + "\n")
    (gpu / "no-such-spec.jsonl").write_text("")
    build("experiments", tmp_path / "logs", tmp_path / "out")
    err = capsys.readouterr().err
    assert "no spec no-such-spec.yaml" in err and "checks.jsonl" not in err


def test_gpu_comparison_sets_each_gpus_ratio_against_flex_side_by_side(workspace):
    """One GPU alone gets no comparison; with a second GPU's seed-fwd log (flex 2x slower than ours there, one
    point only on the first GPU) each common point shows each GPU's own ratio, and the lone point is left out."""
    out = workspace.parent / "out"
    build(workspace, workspace / "logs", out)
    assert not (out / "gpu-comparison.md").exists() and "Across GPUs" not in (out / "README.md").read_text()

    spec = load_spec(workspace / "seed-fwd.yaml")
    other = workspace / "logs" / "nvidia-other"
    other.mkdir()
    rows = [dict(r, gpu="NVIDIA Other") for r in fake_rows(spec)]
    slower = lambda r: {k: 2.0 * r[k] / 1.5 for k in ("ms", "ms_p20", "ms_p80")}
    rows = [dict(r, **slower(r)) if r["provider"] == "flex" else r for r in rows]
    lone = min(p.L for p in spec.points())
    rows = [r for r in rows if r["L"] != lone]
    (other / "seed-fwd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(workspace, workspace / "logs", out)

    md = (out / "gpu-comparison.md").read_text()
    assert f"| spec | mode | points | NVIDIA Other | {GPU} |" in md
    common = len({p.L for p in spec.points()}) - 1
    assert f"| seed-fwd | fwd | {common} | 2.00× (2.00–2.00) | 1.50× (1.50–1.50) |" in md
    assert f"L={lone} |" not in md
    assert "| block |" not in md  # measured on one GPU only
    import pandas as pd
    csv = pd.read_csv(out / "gpu-comparison.csv")
    assert len(csv) == common and set(csv["spec"]) == {"seed-fwd"}
    assert (csv[f"speedup_vs_flex {GPU}"] - 1.5).abs().max() < 1e-5
    assert "[gpu-comparison.md](gpu-comparison.md)" in (out / "README.md").read_text()
