"""Tables from the newest log row of each point: a tidy CSV and a readable Markdown file per table.

Kinds (``outputs.tables[].kind`` in a spec):

* ``results``: latency median in ms (and peak memory in MB when measured) per point and provider;
  with ``metric: host`` or ``metric: graph`` the host time per call or the CUDA-graph replay median.
* ``speedup``: the target provider's time against each baseline's: speedup = baseline ms / target ms,
  for the table's ``metric`` (latency by default; host, graph).
* ``errors``: relative error of o, dq, dk, dv, dbias against the fp64 reference, per provider and dtype.

Besides the spec's own tables, :func:`gpu_comparison` sets the GPUs side by side: on every point that each of
them measured, each GPU's own ratio of FlexAttention's latency to ours (the build writes it when logs of one spec
come from more than one GPU).

Columns come from the rows: a metric's fields (host, graph) and the block's ``node`` appear only when some
row of the table holds them, so logs written before they existed give the same bytes as before. A row
that is ``ok`` but whose graph could not be captured shows ``no graph`` in graph tables.

Formatting is fixed (no locale, no dates), so the same rows always give the same bytes.
"""

from __future__ import annotations

from .spec import BLOCK_DEFAULTS, DTYPES, METRIC_FIELDS, MODES, NODES, Spec, TableOut, matches

_CONFIG = ("B", "H", "D", "c_in", "dtype", "mode", "node")
_ERRORS = METRIC_FIELDS["error"]
_NOT_OK = {"oom": "oom", "unsupported": "n/a", "error": "error"}
#: What a table's metric shows (the Markdown caption's words).
_WHAT = {"latency": "latency median", "host": "host time per call (back-to-back calls), median",
         "graph": "CUDA-graph replay median"}


def fmt_ms(x) -> str:
    """Milliseconds: 3 decimals below 1 ms, else 2."""
    return "–" if _missing(x) else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def fmt_mb(x) -> str:
    """Megabytes (2**20 bytes): whole numbers, one decimal below 10."""
    return "–" if _missing(x) else (f"{x:.1f}" if x < 10 else f"{x:.0f}")


def _missing(x) -> bool:
    return x is None or x != x


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub Markdown table (pipes in cells escaped)."""
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in body]
    return "\n".join(lines) + "\n"


def sorted_frame(rows: list[dict], spec: Spec, where: dict):
    """The rows matching ``where`` as a DataFrame in a fixed order (config, L, provider as in the spec)."""
    import pandas as pd  # noqa: PLC0415

    chosen = [r for r in rows if matches(r, where)]
    held = {k for r in chosen for k in r}
    newer = [f for m in ("host", "graph") for f in METRIC_FIELDS[m] if f in held]
    cols = ["provider", *_CONFIG, "L", "status", "ms", "ms_p20", "ms_p80", "peak_mem_mb", *newer, *_ERRORS,
            "error", "gpu", "git_sha", "dirty", "timestamp"]
    df = pd.DataFrame(chosen, columns=cols)
    if spec.op != "triangle_block":
        df = df.drop(columns="c_in")
    if spec.op != "triangle_block" or "node" not in held:
        df = df.drop(columns="node")
    else:  # rows from before the node axis lack it
        df["node"] = df["node"].fillna(BLOCK_DEFAULTS["node"])
    order = {
        "provider": {p: i for i, p in enumerate(spec.providers)},
        "dtype": {d: i for i, d in enumerate(DTYPES)},
        "mode": {m: i for i, m in enumerate(MODES)},
        "node": {n: i for i, n in enumerate(NODES)},
    }
    keys = [c for c in ("dtype", "mode", "B", "H", "D", "c_in", "node", "L", "provider") if c in df.columns]
    df = df.sort_values(keys, key=lambda s: s.map(order[s.name]) if s.name in order else s, kind="stable")
    return df.reset_index(drop=True)


def _lead(caption: str) -> str:
    """The constant-columns caption and its separator, or nothing when every column varies."""
    return f"{caption}; " if caption else ""


def _varying(df) -> tuple[list[str], str]:
    """Config columns that vary (kept as table columns) and a caption naming the constant ones."""
    cols = [c for c in _CONFIG if c in df.columns]
    varying = [c for c in cols if df[c].nunique(dropna=False) > 1]
    const = [f"{c}={df[c].iloc[0]}" for c in cols if c not in varying and len(df)]
    return varying, ", ".join(const)


def _value(r, metric: str):
    """The row's value of ``metric`` (ms), or None when it has none."""
    x = getattr(r, METRIC_FIELDS[metric][0], None)
    return None if r.status != "ok" or _missing(x) else x


def _shown(r, metric: str) -> str:
    """The Markdown text of a row's ``metric``: its value, or why there is none."""
    if r is None:
        return "–"
    if r.status != "ok":
        return _NOT_OK.get(r.status, str(r.status))
    x = _value(r, metric)
    if x is None and metric == "graph" and not _missing(getattr(r, "graph_error", None)):
        return "no graph"
    return fmt_ms(x)


def _cell(r, memory: bool, metric: str = "latency") -> str:
    if r.status != "ok" or metric != "latency":
        return _shown(r, metric)
    return f"{fmt_ms(r.ms)} / {fmt_mb(r.peak_mem_mb)}" if memory else fmt_ms(r.ms)


def shown_providers(spec: Spec, where: dict) -> list[str]:
    """The spec's providers a table shows, in the spec's order: those its ``where`` names, if it names any."""
    named = where.get("provider")
    if named is None:
        return list(spec.providers)
    named = set(named) if isinstance(named, list) else {named}
    return [p for p in spec.providers if p in named]


def results(df, spec: Spec, metric: str = "latency", where: dict | None = None):
    """(tidy frame, Markdown body) of a ``results`` table: providers as columns (those ``where`` names, if it
    names any), points as rows."""
    memory = "memory" in spec.metrics and metric == "latency"
    providers = shown_providers(spec, where or {})
    varying, caption = _varying(df)
    keys = [*varying, "L"]
    body = []
    for vals, g in df.groupby(keys, sort=False):
        by_prov = {r.provider: _cell(r, memory, metric) for r in g.itertuples()}
        body.append([str(v) for v in vals] + [by_prov.get(p, "–") for p in providers])
    what = "latency median, ms / peak memory, MB (2^20 bytes)" if memory else f"{_WHAT[metric]}, ms"
    text = f"{_lead(caption)}{what}.\n\n" + markdown_table(keys + providers, body)
    if metric == "latency":
        tidy = df.drop(columns=[c for c in _ERRORS if c in df.columns])
    else:  # the point, the metric's own fields and the provenance
        ident = [c for c in ("provider", *_CONFIG, "L", "status") if c in df.columns]
        own = [c for c in METRIC_FIELDS[metric] if c in df.columns]
        tidy = df[[*ident, *own, "error", "gpu", "git_sha", "dirty", "timestamp"]]
    return tidy, text


def speedup(df, spec: Spec, table: TableOut):
    """(tidy frame, Markdown body) of a ``speedup`` table: baseline ms / target ms per point."""
    import pandas as pd  # noqa: PLC0415

    metric = table.metric
    field = METRIC_FIELDS[metric][0]  # ms, host_ms, graph_ms: the tidy columns are <provider>_<field>
    varying, caption = _varying(df)
    keys = [c for c in _CONFIG if c in df.columns] + ["L"]
    tidy_rows, body = [], []
    for vals, g in df.groupby(keys, sort=False, dropna=False):
        by_prov = {r.provider: r for r in g.itertuples()}
        ms = {p: _value(r, metric) for p, r in by_prov.items() if _value(r, metric) is not None}
        shown = {p: _shown(by_prov.get(p), metric) for p in (table.target, *table.baselines)}
        rec = dict(zip(keys, vals, strict=True))
        rec[f"{table.target}_{field}"] = ms.get(table.target)
        line = [str(rec[k]) for k in [*varying, "L"]] + [shown[table.target]]
        for b in table.baselines:
            sp = ms[b] / ms[table.target] if b in ms and table.target in ms else None
            rec[f"{b}_{field}"], rec[f"speedup_vs_{b}"] = ms.get(b), sp
            line += [shown[b], "–" if sp is None else f"{sp:.2f}×"]
        tidy_rows.append(rec)
        body.append(line)
    header = [*varying, "L", f"{table.target} ms"]
    for b in table.baselines:
        header += [f"{b} ms", f"vs {b}"]
    text = f"{_lead(caption)}{_WHAT[metric]} in ms, speedup = baseline ms / {table.target} ms.\n\n"
    return pd.DataFrame(tidy_rows), text + markdown_table(header, body)


def errors(df, spec: Spec):
    """(tidy frame, Markdown body) of an ``errors`` table: relative errors against fp64."""
    varying, caption = _varying(df)
    keys = ["dtype", *[c for c in varying if c != "dtype"], "L", "provider"]
    cols = [c for c in _ERRORS if df[c].notna().any()] or ["err_o"]
    body = []
    for r in df.itertuples():
        vals = [str(getattr(r, k)) for k in keys]
        if r.status != "ok":
            body.append(vals + [_NOT_OK.get(r.status, str(r.status))] * len(cols))
        else:
            body.append(vals + ["–" if _missing(getattr(r, c)) else f"{getattr(r, c):.2e}" for c in cols])
    text = (f"{_lead(caption)}relative error ‖x − ref‖ / ‖ref‖ against the float64 reference "
            f"(same inputs and dO).\n\n")
    tidy = df[["provider", *[c for c in _CONFIG if c in df.columns], "L", "status", *_ERRORS, "error",
               "gpu", "git_sha", "timestamp"]]
    return tidy, text + markdown_table([*keys, *[c.replace("err_", "") for c in cols]], body)


#: The cross-GPU comparison's two providers: the ratio is baseline ms / target ms on each GPU.
COMPARISON_TARGET, COMPARISON_BASELINE = "flash_tt_attn", "flex"


def _ratios(rows: list[dict], spec: Spec) -> dict:
    """{point key: (label, mode, baseline ms / target ms)} of the points where both were measured ``ok``
    (the ``speedup`` table's own ratios)."""
    table = TableOut("gpu-comparison", "speedup", {}, COMPARISON_TARGET, (COMPARISON_BASELINE,))
    tidy, _ = speedup(sorted_frame(rows, spec, table.where), spec, table)
    keys = [c for c in _CONFIG if c in tidy.columns] + ["L"]
    out = {}
    for rec in tidy.to_dict("records"):
        ratio = rec[f"speedup_vs_{COMPARISON_BASELINE}"]
        if not _missing(ratio):
            label = " ".join(f"{k}={rec[k]}" for k in keys if k != "mode")
            out[tuple(rec[k] for k in keys)] = (label, rec["mode"], ratio)
    return out


def gpu_comparison(measured: list) -> tuple | None:
    """(tidy frame, Markdown body, ids of the specs shown) of the GPUs side by side, or None when no point
    compares. ``measured`` holds, per spec, ``(spec, {gpu: rows})`` with rows from two or more GPUs; a point
    is shown when every one of those GPUs has its ratio."""
    import statistics  # noqa: PLC0415

    import pandas as pd  # noqa: PLC0415

    gpus = sorted({g for _, by_gpu in measured for g in by_gpu})
    tidy, summary, detail, shown_specs = [], [], [], []
    for spec, by_gpu in measured:
        if not {COMPARISON_TARGET, COMPARISON_BASELINE} <= set(spec.providers):
            continue
        ratios = {g: _ratios(rows, spec) for g, rows in by_gpu.items()}
        first = ratios[min(by_gpu)]
        common = [k for k in first if all(k in r for r in ratios.values())]
        for mode in MODES:
            points = [k for k in common if first[k][1] == mode]
            if not points:
                continue
            cells = []
            for g in gpus:
                if g not in ratios:
                    cells.append("–")
                    continue
                xs = [ratios[g][k][2] for k in points]
                cells.append(f"{statistics.median(xs):.2f}× ({min(xs):.2f}–{max(xs):.2f})")
            summary.append([spec.id, mode, str(len(points)), *cells])
            shown_specs += [spec.id] if spec.id not in shown_specs else []
            for k in points:
                shown = [f"{ratios[g][k][2]:.2f}×" if g in ratios else "–" for g in gpus]
                detail.append([spec.id, mode, first[k][0], *shown])
                tidy.append({"spec": spec.id, "mode": mode, "point": first[k][0],
                             **{f"speedup_vs_{COMPARISON_BASELINE} {g}": ratios[g][k][2] if g in ratios else None
                                for g in gpus}})
    if not summary:
        return None
    what = f"{COMPARISON_BASELINE} ms / {COMPARISON_TARGET} ms on each GPU"
    text = (f"Latency speedup = {what}, on the points that every GPU named in the row measured (newest row per "
            f"point; a spec's points can differ between GPUs when the spec grew).\n\n"
            f"## Per spec and mode: median (min–max) over the points\n\n"
            + markdown_table(["spec", "mode", "points", *gpus], summary)
            + "\n## Per point\n\n" + markdown_table(["spec", "mode", "point", *gpus], detail))
    return pd.DataFrame(tidy), text, shown_specs


def write_table(rows: list[dict], spec: Spec, table: TableOut, out_stem, title: str, source: str) -> list:
    """Write ``<out_stem>.csv`` and ``<out_stem>.md``; return the two paths."""
    from pathlib import Path  # noqa: PLC0415

    df = sorted_frame(rows, spec, table.where)
    if table.kind == "results":
        tidy, body = results(df, spec, table.metric, table.where)
    elif table.kind == "speedup":
        tidy, body = speedup(df, spec, table)
    else:
        tidy, body = errors(df, spec)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = out_stem.with_suffix(".csv"), out_stem.with_suffix(".md")
    tidy.to_csv(csv, index=False, float_format="%.6g", lineterminator="\n")
    md.write_text(f"# {title}\n\nSource: [{Path(source).name}]({source}) (newest row per point).\n\n{body}",
                  encoding="utf-8", newline="\n")
    return [csv, md]
