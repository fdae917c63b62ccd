"""The ``figures`` command: committed raw logs -> tables, figures and their index in ``paper_figures/``.

For every GPU folder ``<logs>/<slug>/`` and every spec with a log there, the spec's declared outputs
are written to ``<out>/<slug>/``. Only rows of points the spec currently declares are used, and of
several rows for one point (reruns on newer code) the newest by timestamp. ``<out>/README.md`` lists
every output with the spec and log it came from. When one spec has logs from more than one GPU,
``<out>/gpu-comparison.md`` (and ``.csv``) sets the GPUs' ratios against FlexAttention side by side
(:func:`tables.gpu_comparison`). No GPU is needed; the same logs give the same bytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .logs import CHECKS_LOG, newest, read_rows
from .spec import METRIC_FIELDS, all_spec_paths, load_spec, matches, row_key


def _rel(path, start) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _config_text(df) -> str:
    r = df.iloc[0]
    c_in = f" c_in={r['c_in']}" if "c_in" in df.columns else ""
    node = f" {r['node']} node" if "node" in df.columns else ""  # rows from before the node axis: none
    return f"B={r['B']} H={r['H']} D={r['D']}{c_in}{node} {r['dtype']} {r['mode']}"


def build(specs_dir="experiments", logs_dir="experiments/logs", out_dir="paper_figures") -> list[Path]:
    """Regenerate every table and figure from the logs; return the paths written (README last)."""
    from . import figures, tables  # noqa: PLC0415

    specs = [load_spec(p) for p in all_spec_paths(specs_dir)]
    logs_dir, out_dir = Path(logs_dir), Path(out_dir)
    claimed = {}
    for spec in specs:
        for name in [f.file for f in spec.figures] + [t.file for t in spec.tables]:
            if name in claimed:
                raise ValueError(f"output {name!r} is declared by both {claimed[name]} and {spec.path}")
            claimed[name] = spec.path

    written, index = [], []
    by_spec = {spec.id: {} for spec in specs}  # spec id -> {gpu: rows}, for the cross-GPU comparison
    slugs = sorted(p.name for p in logs_dir.iterdir() if p.is_dir()) if logs_dir.is_dir() else []
    for slug in slugs:
        known = {s.id for s in specs} | {CHECKS_LOG}
        for stray in sorted((logs_dir / slug).glob("*.jsonl")):
            if stray.stem not in known:
                print(f"flash_tt_attn.bench: {stray}: no spec {stray.stem}.yaml; ignored", file=sys.stderr)
        for spec in specs:
            log = logs_dir / slug / f"{spec.id}.jsonl"
            if not log.exists():
                continue
            keys = {p.key() for p in spec.points()}
            rows = [r for r in newest(read_rows(log)) if row_key(r) in keys]
            if not rows:
                continue
            gpu = " + ".join(sorted({str(r.get("gpu")) for r in rows}))
            by_spec[spec.id][gpu] = rows
            source = _rel(log, out_dir / slug)
            for fig in spec.figures:
                df = tables.sorted_frame(rows, spec, fig.where)
                col = figures.column(fig.metric)
                if col not in df.columns or not df[col].notna().any():
                    print(f"flash_tt_attn.bench: {log}: no {fig.metric} values for {fig.file}; skipped",
                          file=sys.stderr)
                    continue
                path = out_dir / slug / fig.file
                path.parent.mkdir(parents=True, exist_ok=True)
                title = f"{spec.id}: {fig.metric}, {_config_text(df)}\nmeasured on {gpu}"
                figures.plot(df, spec, fig, title, path)
                written.append(path)
                index.append((slug, gpu, path, f"figure ({fig.metric} vs L)", spec, log))
            for tab in spec.tables:
                chosen = [r for r in rows if matches(r, tab.where)]
                if not chosen:
                    continue
                if tab.kind != "errors" and not any(METRIC_FIELDS[tab.metric][0] in r for r in chosen):
                    # rows measured before the spec asked for this metric (latency rows always hold ms)
                    print(f"flash_tt_attn.bench: {log}: no {tab.metric} fields for {tab.file}; skipped",
                          file=sys.stderr)
                    continue
                title = f"{spec.id}: {tab.kind} ({gpu})" if tab.metric == "latency" else \
                    f"{spec.id}: {tab.kind} of {tab.metric} ({gpu})"
                paths = tables.write_table(rows, spec, tab, out_dir / slug / tab.file, title, source)
                written += paths
                what = f"table ({tab.kind})" if tab.metric == "latency" else f"table ({tab.kind}, {tab.metric})"
                index += [(slug, gpu, p, what, spec, log) for p in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = _write_gpu_comparison([(s, by_spec[s.id]) for s in specs if len(by_spec[s.id]) > 1], out_dir)
    written += comparison
    readme = out_dir / "README.md"
    readme.write_text(_index_text(index, specs, out_dir, slugs, logs_dir, comparison), encoding="utf-8",
                      newline="\n")
    return written + [readme]


def _write_gpu_comparison(measured: list, out_dir: Path) -> list[Path]:
    """Write ``gpu-comparison.csv`` and ``.md`` when some spec was measured on two or more GPUs."""
    from . import tables  # noqa: PLC0415

    compared = tables.gpu_comparison(measured)
    if compared is None:
        return []
    tidy, body, shown = compared
    csv, md = out_dir / "gpu-comparison.csv", out_dir / "gpu-comparison.md"
    tidy.to_csv(csv, index=False, float_format="%.6g", lineterminator="\n")
    md.write_text(f"# The GPUs side by side\n\nSource: the raw logs of {', '.join(shown)} under "
                  f"`experiments/logs/<gpu>/`.\n\n{body}", encoding="utf-8", newline="\n")
    return [csv, md]


def _index_text(index, specs, out_dir: Path, slugs, logs_dir: Path, comparison=()) -> str:
    lines = [
        "# Paper figures and tables",
        "",
        "Generated by `python -m flash_tt_attn.bench figures` (`nox -s figures`) from the committed raw logs",
        "under `experiments/logs/<gpu>/<spec>.jsonl`; do not edit by hand. Each output is a pure function of",
        "the log named beside it (the newest row per point, only points the spec declares). Rerun with",
        "`python -m flash_tt_attn.bench run <spec>` on a GPU, commit the log, regenerate.",
        "",
    ]
    for slug in slugs:
        entries = [e for e in index if e[0] == slug]
        if not entries:
            continue
        lines += [f"## {entries[0][1]} (`{slug}/`)", "", "| output | what | spec | raw log |", "|---|---|---|---|"]
        for _, _, path, what, spec, log in entries:
            lines.append(f"| [{path.name}]({_rel(path, out_dir)}) | {what} | "
                         f"[{spec.id}]({_rel(spec.path, out_dir)}) | [{log.name}]({_rel(log, out_dir)}) |")
        lines.append("")
    if comparison:
        lines += ["## Across GPUs", "", "Each GPU's speedup over FlexAttention on the points every GPU measured: "
                  + ", ".join(f"[{p.name}]({_rel(p, out_dir)})" for p in comparison) + ".", ""]
    measured = {e[4].id for e in index}
    missing = [s.id for s in specs if s.id not in measured]
    if missing:
        lines += ["## Not measured yet", "", "Specs without a log row: " + ", ".join(f"`{m}`" for m in missing)
                  + ".", ""]
    return "\n".join(lines)

