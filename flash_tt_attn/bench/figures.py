"""Latency / memory / host-time / CUDA-graph vs L figures, one line per provider, with deterministic PNG bytes.

Determinism: the Agg backend, one fixed style (rcParams below, DejaVu Sans shipped with matplotlib),
fixed size and dpi, fixed colours and markers per provider, inputs sorted, and PNG metadata without
the "Software" stamp (matplotlib writes no date into PNGs).
"""

from __future__ import annotations

import itertools

from .spec import BIAS_FREE, PROVIDERS, FigureOut, Spec

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "figure.figsize": (6.4, 4.4),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "path.simplify": False,
    "svg.hashsalt": "flash_tt_attn",
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LABELS = {"latency": ("ms", "latency (ms, median; bars p20–p80)"),
           "memory": ("peak_mem_mb", "peak memory (MB = 2^20 bytes)"),
           "host": ("host_ms", "host time per call, back-to-back (ms, median; bars p20–p80)"),
           "graph": ("graph_ms", "CUDA graph replay (ms, median; bars p20–p80)")}
#: Metrics drawn with p20–p80 bars (their rows hold ``<column>_p20`` and ``<column>_p80``).
_QUANTILED = ("latency", "host", "graph")


def column(metric: str) -> str:
    """The row field a figure of ``metric`` plots."""
    return _LABELS[metric][0]


def _style(providers=()):
    """Colors and markers per provider: a fixed one for every known provider (the attention ones first, so their
    figures keep their looks; then the block's own), then for other names in ``providers`` (a spec's variants).
    Colors: seaborn's colorblind palette, then its dark one (twenty distinct, then they repeat); markers repeat
    after eight."""
    import seaborn as sns  # noqa: PLC0415

    names = list(dict.fromkeys([*PROVIDERS["attention"], *PROVIDERS["triangle_block"], *providers]))
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    colors = dict(zip(names, itertools.cycle(palette)))
    markers = dict(zip(names, itertools.cycle(_MARKERS)))
    return colors, markers


def _not_measured(df, metric: str) -> str:
    notes = []
    for (prov, status), g in df[df.status != "ok"].groupby(["provider", "status"], sort=True):
        ls = ", ".join(str(x) for x in sorted(g.L.unique()))
        notes.append(f"{prov}: {status} at L={ls}")
    if metric == "graph" and "graph_error" in df.columns:
        failed = df[(df.status == "ok") & df.graph_error.notna()]
        for prov, g in failed.groupby("provider", sort=True):
            ls = ", ".join(str(x) for x in sorted(g.L.unique()))
            notes.append(f"{prov}: no graph at L={ls}")
    return "; ".join(notes)


def plot(df, spec: Spec, fig: FigureOut, title: str, path) -> None:
    """Draw ``fig.metric`` vs L for the rows ``df`` (one config, newest row per point) into ``path``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import seaborn as sns  # noqa: PLC0415

    col, ylabel = _LABELS[fig.metric]
    ok = df[(df.status == "ok") & df[col].notna()]
    providers = [p for p in spec.providers if p in set(ok.provider)]
    colors, markers = _style(providers)
    with plt.rc_context(RC), sns.axes_style("whitegrid"):
        plt.rcParams.update(RC)
        f, ax = plt.subplots()
        if providers:
            # The bias-free reference ceilings are dashed: they run less work than the others.
            dashes = {p: (4, 2) if p in BIAS_FREE else "" for p in providers}
            sns.lineplot(data=ok, x="L", y=col, hue="provider", hue_order=providers, style="provider",
                         style_order=providers, palette=colors, markers=markers, dashes=dashes, errorbar=None,
                         ax=ax)
        if fig.metric in _QUANTILED:
            for p in providers:
                g = ok[ok.provider == p].sort_values("L")
                mid, lo, hi = g[col], g[f"{col}_p20"], g[f"{col}_p80"]
                ax.errorbar(g.L, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor=colors[p], capsize=2,
                            linewidth=0.8)
        ls = sorted(df.L.unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ls, [str(x) for x in ls])
        ax.minorticks_off()
        if len(ok):
            ax.set_yscale("log")
        ax.set_xlabel("L (pair representation is L × L)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        note = _not_measured(df, fig.metric)
        if note:
            f.text(0.01, 0.01, "not measured: " + note, fontsize=7, ha="left", va="bottom", wrap=True)
        f.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
        f.savefig(path, format="png", metadata={"Software": None})
        plt.close(f)
