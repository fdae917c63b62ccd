"""Benchmark specs: load ``experiments/<id>.yaml``, validate every field, expand sweeps into points.

A spec is declarative; everything a run or a figure needs is in it::

    id: seed-fwd                      # must equal the file's stem; names the log file
    description: ...
    op: attention                     # or triangle_block (the whole AF2 TriangleAttention module)
    providers: [flash_tt_attn, naive, sdpa, flex, trifast, cueq]   # and flex_plain, sdpa_cudnn_plain (no bias)
    metrics: [latency, memory]        # and host, graph; or [error] (relative error against an fp64 reference)
    timing: {warmup_ms: 25, rep_ms: 100}
    sweeps:                           # one or more blocks; each is the cross product of its axes
      - {B: [4], H: [8], D: [32], L: [32, 64], dtype: [float16], mode: [fwd]}
      - {B: [2], H: [8], D: [32], L: [64], dtype: [float16], mode: [fwd], providers: [flash_tt_attn]}
    outputs:
      figures:                        # x = L, one line per provider; `where` must pick one config
        - {file: fused-attention-batch4-head8-d32-fwd-latency.png, metric: latency, where: {mode: fwd}}
      tables:                         # writes <file>.csv (tidy) and <file>.md (readable)
        - {file: seed-fwd, kind: results}        # kinds: results | speedup | errors
        - {file: seed-fwd-graph-speedup, kind: speedup, metric: graph}   # metric: latency (default) | host | graph

Metrics (:data:`METRIC_FIELDS` lists the row fields each one writes; measure.py says how):

* ``latency``: the eager call, ``triton.testing.do_bench`` median / p20 / p80 in ms (``ms``, ``ms_p20``, ``ms_p80``).
* ``memory``: peak memory of one call above the inputs, MB (``peak_mem_mb``).
* ``host``: the host's time per call over back-to-back calls with no synchronisation between them
  (``host_ms``, ``host_ms_p20``, ``host_ms_p80``; ``host_wall_ms``: the loop's wall time, final sync
  included, per call; ``host_calls``).
* ``graph``: the call captured once in a CUDA graph and replayed, timed as ``latency`` (``graph_ms``,
  ``graph_ms_p20``, ``graph_ms_p80``); a provider that cannot be captured keeps its other metrics and
  says why in ``graph_error``. Off CUDA the four fields are null.
* ``error``: relative errors against fp64 (``err_o``, ``err_dq``, ...); measured on its own.

For ``op: triangle_block`` a sweep also has ``c_in`` (input channels) and may have ``node``
(``starting`` or ``ending``: which AlphaFold block, Algorithm 13 or 14; default ``starting``); ``H`` is
the number of heads and ``D`` the per-head hidden size (AlphaFold's ``c_hidden``). Log rows written
before ``node`` existed lack it and count as ``starting``.

A sweep may name ``providers``, a subset of the spec's: only those run its points (default: all of them).

``variants`` (optional) names A/B variants of ``flash_tt_attn`` with some of its switches set (the fields of
:class:`flash_tt_attn.tuning.KernelOptions` listed in :data:`VARIANT_OPTIONS`); a variant's name is then a
provider of the spec, and its rows carry the options. ``provider`` (optional) names which of our providers
(:data:`OURS`) the variant runs, ``flash_tt_attn`` by default::

    variants: {fast_exp2_off: {fast_exp2: false}, l4_tiles: {shared_memory_per_program: 101376},
               padded_uncapped: {provider: flash_tt_attn_lengths, register_caps: false}}
    providers: [flash_tt_attn, fast_exp2_off, l4_tiles, flash_tt_attn_lengths, padded_uncapped]

Attention providers (providers.py): ``flash_tt_attn``, ``naive``, ``sdpa``, ``flex``, ``trifast``, ``cueq``,
the bias-free ceilings ``flex_plain`` and ``sdpa_cudnn_plain``, and ours with ``lengths=``:
``flash_tt_attn_lengths`` (odd batch items of L/2 residues) and ``flash_tt_attn_lengths_full`` (all of L).

Block providers (providers.py): ``flash_tt_attn`` and ``naive`` (TriangleAttention and
TriangleAttentionReference, called as ``module(x)``: under ``no_grad`` ours chunks its rows by
modules.auto_chunk_size), ``flash_tt_attn_whole`` (ours with ``chunk_size=L``: never chunked),
``naive_chunk4`` / ``naive_chunk128`` (the reference with OpenFold-style chunking), ``cueq`` (our block with
cuEquivariance's triangle_attention inside) and ``flash_tt_attn_lengths`` (ours with ``lengths=``: odd batch
items have L/2 residues and a padded tail).

Any unknown field, wrong type or empty list raises :class:`SpecError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

OPS = ("attention", "triangle_block")
PROVIDERS = {
    "attention": ("flash_tt_attn", "naive", "sdpa", "flex", "trifast", "cueq", "flex_plain", "sdpa_cudnn_plain",
                  "flash_tt_attn_lengths", "flash_tt_attn_lengths_full"),
    "triangle_block": ("flash_tt_attn", "naive", "flash_tt_attn_whole", "flash_tt_attn_lengths",
                       "flash_tt_attn_host_lengths", "naive_chunk4", "naive_chunk128", "cueq"),
}
#: Our providers per op: a spec's variant runs one of them (``provider`` in the variant, default flash_tt_attn).
OURS = {op: tuple(p for p in names if p.startswith("flash_tt_attn")) for op, names in PROVIDERS.items()}
#: Reference ceilings that run plain attention with no bias (providers.py): latency and memory only.
BIAS_FREE = ("flex_plain", "sdpa_cudnn_plain")
#: Attention providers whose batch has a padded tail (providers.py): their padded pairs are 0 by design.
PADDED = ("flash_tt_attn_lengths",)
METRICS = ("latency", "memory", "host", "graph", "error")
#: The row fields each metric writes (a row of a spec asking for the metric holds them all, null when not
#: measured); the first is its value (what tables and figures show), and for the timed ones
#: ``<value>_p20`` / ``<value>_p80`` are its quantiles.
METRIC_FIELDS = {
    "latency": ("ms", "ms_p20", "ms_p80"),
    "memory": ("peak_mem_mb",),
    "host": ("host_ms", "host_ms_p20", "host_ms_p80", "host_wall_ms", "host_calls"),
    "graph": ("graph_ms", "graph_ms_p20", "graph_ms_p80", "graph_error"),
    "error": ("err_o", "err_dq", "err_dk", "err_dv", "err_dbias"),
}
#: Metrics a table (``results``, ``speedup``) or a figure can show.
TABLE_METRICS = ("latency", "host", "graph")
FIGURE_METRICS = ("latency", "memory", "host", "graph")
NODES = ("starting", "ending")
DTYPES = ("float16", "bfloat16", "float32")
MODES = ("fwd", "fwd_bwd")
INT_AXES = ("B", "H", "D", "L", "c_in")
#: Axes only the block op has, with the value a row without the field counts as.
BLOCK_DEFAULTS = {"node": "starting"}
TABLE_KINDS = ("results", "speedup", "errors")
DEFAULT_WARMUP_MS = 25.0
DEFAULT_REP_MS = 100.0

#: The fields that identify a measured point (a log row with the same values measures the same thing).
KEY_FIELDS = ("spec", "op", "provider", "B", "H", "L", "D", "dtype", "mode", "c_in", "node")
#: The fields a point shares with the other points of one figure line (all but L and provider).
CONFIG_FIELDS = ("op", "B", "H", "D", "c_in", "node", "dtype", "mode")

_TOP_FIELDS = {"id", "description", "op", "providers", "variants", "metrics", "timing", "sweeps", "outputs"}
#: The launchers' switches a spec's variant may set (flash_tt_attn.tuning.KernelOptions), with their types.
VARIANT_OPTIONS = {"fast_exp2": bool, "settle_accumulators": bool, "dbias_unscaled_scores": bool,
                   "direct_eager_calls": bool, "dbias_splits": int, "shared_memory_per_program": int,
                   "register_caps": bool, "end_tile_select": bool,
                   "pad_bias_tiles": bool, "pad_bias_tiles_backward": bool, "fold_split_sum": bool,
                   "fold_bias_copy": bool, "block_qkv_copies": bool, "block_fused_projections": bool,
                   "block_triton_layer_norm": bool, "block_heads_last_output": bool}
_SWEEP_FIELDS = {"B", "H", "D", "L", "c_in", "node", "dtype", "mode"}
#: Sweep fields that are not axes of a point (``where`` cannot name them).
_SWEEP_ONLY = {"providers"}
_TIMING_FIELDS = {"warmup_ms", "rep_ms"}
_OUTPUT_FIELDS = {"figures", "tables"}
_FIGURE_FIELDS = {"file", "metric", "where"}
_TABLE_FIELDS = {"file", "kind", "metric", "where", "target", "baselines"}


class SpecError(ValueError):
    """A spec file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Point:
    """One measurement: a provider at one shape, dtype and mode."""

    spec: str
    op: str
    provider: str
    B: int
    H: int
    L: int
    D: int
    dtype: str
    mode: str
    c_in: int | None = None
    node: str | None = None
    #: a variant's switches as (name, value) pairs (``variants`` in the spec), else None
    options: tuple | None = None

    def key(self) -> tuple:
        """The resume key, equal to :func:`row_key` of the row that measures this point."""
        return tuple(getattr(self, f) for f in KEY_FIELDS)

    def fields(self) -> dict:
        """The point's fields as they go into a log row (``c_in`` and ``node`` only for the block op)."""
        fields = {f: getattr(self, f) for f in KEY_FIELDS if f not in ("c_in", "node") or getattr(self, f) is not None}
        if self.options is not None:
            fields["options"] = dict(self.options)
        return fields

    def label(self) -> str:
        """A short human-readable name, e.g. ``naive B4-H8-L64-D32-float16-fwd``."""
        extra = f"-C{self.c_in}" if self.c_in is not None else ""
        extra += f"-{self.node}" if self.node is not None else ""
        return f"{self.provider} B{self.B}-H{self.H}-L{self.L}-D{self.D}{extra}-{self.dtype}-{self.mode}"


def field_value(values: dict, name: str):
    """``values[name]`` (a row's or a point's field), or what a row without it counts as: rows written
    before ``op`` existed are ``attention``, block rows written before ``node`` existed ``starting``."""
    if name in values:
        return values[name]
    if name == "op":
        return "attention"
    if values.get("op") == "triangle_block":
        return BLOCK_DEFAULTS.get(name)
    return None


def row_key(row: dict) -> tuple:
    """The resume key of a log row (missing fields as :func:`field_value` reads them)."""
    return tuple(field_value(row, f) for f in KEY_FIELDS)


@dataclass(frozen=True)
class FigureOut:
    """A figure a spec feeds: ``metric`` vs L, one line per provider, rows chosen by ``where``."""

    file: str
    metric: str
    where: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TableOut:
    """A table a spec feeds (``file`` is a stem: ``.csv`` and ``.md`` are written)."""

    file: str
    kind: str
    where: dict = field(default_factory=dict)
    target: str = "flash_tt_attn"
    baselines: tuple = ()
    metric: str = "latency"


@dataclass(frozen=True)
class Spec:
    """A validated spec. Build it with :func:`load_spec`."""

    id: str
    description: str
    op: str
    providers: tuple
    metrics: tuple
    warmup_ms: float
    rep_ms: float
    sweeps: tuple
    figures: tuple
    tables: tuple
    path: str
    variants: tuple = ()  # (name, ((option, value), ...)) pairs

    def points(self) -> list[Point]:
        """Every point of every sweep, in run order (sweep, dtype, mode, B, H, D, c_in, node, L, provider),
        no repeats."""
        seen, out = set(), []
        block = self.op == "triangle_block"
        for sw in self.sweeps:
            nodes = sw.get("node", [BLOCK_DEFAULTS["node"]] if block else [None])
            providers = [p for p in self.providers if p in sw.get("providers", self.providers)]
            axes = [sw["dtype"], sw["mode"], sw["B"], sw["H"], sw["D"], sw.get("c_in", [None]), nodes, sw["L"],
                    providers]
            for dtype, mode, B, H, D, c_in, node, L, prov in itertools.product(*axes):
                p = Point(self.id, self.op, prov, B, H, L, D, dtype, mode, c_in, node, dict(self.variants).get(prov))
                if p.key() not in seen:
                    seen.add(p.key())
                    out.append(p)
        return out


def matches(values: dict, where: dict) -> bool:
    """True when ``values`` (a point's or row's fields) satisfies every ``where`` condition (scalar or list);
    a field a row lacks counts as :func:`field_value` reads it."""
    for k, want in where.items():
        allowed = want if isinstance(want, list) else [want]
        if field_value(values, k) not in allowed:
            return False
    return True


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, fieldname: str, problem: str):
        raise SpecError(f"{self.path}: field '{fieldname}': {problem}")

    def mapping(self, value, name: str, allowed: set, required: set = frozenset()) -> dict:
        if not isinstance(value, dict):
            self.fail(name, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                where = f"{name}.{k}" if name != "<top>" else str(k)
                self.fail(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required):
            if k not in value:
                self.fail(k if name == "<top>" else f"{name}.{k}", "missing required field")
        return value

    def string(self, value, name: str, choices=None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(name, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(name, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def number(self, value, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.fail(name, f"expected a positive number, got {value!r}")
        return float(value)

    def nonempty_list(self, value, name: str) -> list:
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {type(value).__name__} {value!r}")
        if not value:
            self.fail(name, "empty list (an empty sweep measures nothing)")
        return value

    def int_list(self, value, name: str) -> list:
        for i, x in enumerate(self.nonempty_list(value, name)):
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                self.fail(f"{name}[{i}]", f"expected a positive integer, got {x!r}")
        return list(value)

    def str_list(self, value, name: str, choices) -> list:
        for i, x in enumerate(self.nonempty_list(value, name)):
            self.string(x, f"{name}[{i}]", choices)
        return list(value)


def _check_where(c: _Checker, where, name: str) -> dict:
    c.mapping(where, name, _SWEEP_FIELDS | {"provider"})
    for k, v in where.items():
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, (dict, list)) or x is None:
                c.fail(f"{name}.{k}", f"expected a scalar or a list of scalars, got {v!r}")
    return dict(where)


def parse_spec(data, path: str) -> Spec:
    """Validate the parsed YAML ``data`` of the spec file ``path`` and return a :class:`Spec`."""
    c = _Checker(path)
    c.mapping(data, "<top>", _TOP_FIELDS, {"id", "description", "providers", "metrics", "sweeps"})
    spec_id = c.string(data["id"], "id")
    stem = Path(path).stem
    if Path(path).suffix in (".yaml", ".yml") and stem != spec_id:
        c.fail("id", f"{spec_id!r} must equal the file name's stem {stem!r}")
    description = c.string(data["description"], "description")
    op = c.string(data.get("op", "attention"), "op", OPS)
    variants = _parse_variants(c, data.get("variants", {}), op)
    providers = c.str_list(data["providers"], "providers", PROVIDERS[op] + tuple(name for name, _ in variants))
    metrics = c.str_list(data["metrics"], "metrics", METRICS)
    if len(set(metrics)) != len(metrics):
        c.fail("metrics", f"a metric is named twice: {metrics}")
    if "error" in metrics and len(metrics) > 1:
        c.fail("metrics", "'error' is measured on its own: use [error] or a subset of [latency, memory, host, graph]")
    if "error" in metrics and op != "attention":
        c.fail("metrics", "'error' is only defined for op: attention")
    runs = {**{p: p for p in providers}, **{name: variant_provider(opts) for name, opts in variants}}
    for without_errors, why in ((BIAS_FREE, "run without the bias (reference ceilings for latency and memory)"),
                                (PADDED, "leave a padded tail out (its pairs are 0 by design)")):
        excluded = sorted(p for p in providers if runs[p] in without_errors)
        if "error" in metrics and excluded:
            c.fail("providers", f"{excluded} {why}: their errors against the reference would mean nothing")
    timing = c.mapping(data.get("timing", {}), "timing", _TIMING_FIELDS)
    warmup_ms = c.number(timing.get("warmup_ms", DEFAULT_WARMUP_MS), "timing.warmup_ms")
    rep_ms = c.number(timing.get("rep_ms", DEFAULT_REP_MS), "timing.rep_ms")

    sweeps = []
    required = {"B", "H", "D", "L", "dtype", "mode"} | ({"c_in"} if op == "triangle_block" else set())
    for i, sw in enumerate(c.nonempty_list(data["sweeps"], "sweeps")):
        name = f"sweeps[{i}]"
        c.mapping(sw, name, _SWEEP_FIELDS | _SWEEP_ONLY, required)
        for ax in ("c_in", "node"):
            if op == "attention" and ax in sw:
                c.fail(f"{name}.{ax}", "only for op: triangle_block")
        clean = {ax: c.int_list(sw[ax], f"{name}.{ax}") for ax in INT_AXES if ax in sw}
        clean["dtype"] = c.str_list(sw["dtype"], f"{name}.dtype", DTYPES)
        clean["mode"] = c.str_list(sw["mode"], f"{name}.mode", MODES)
        if "node" in sw:
            clean["node"] = c.str_list(sw["node"], f"{name}.node", NODES)
        if "providers" in sw:
            clean["providers"] = c.str_list(sw["providers"], f"{name}.providers", providers)
        sweeps.append(clean)

    spec = Spec(spec_id, description, op, tuple(providers), tuple(metrics), warmup_ms, rep_ms, tuple(sweeps),
                (), (), path, variants)
    outputs = c.mapping(data.get("outputs", {}), "outputs", _OUTPUT_FIELDS)
    figures = _parse_figures(c, spec, outputs.get("figures", []))
    tables = _parse_tables(c, spec, outputs.get("tables", []))
    return dataclasses.replace(spec, figures=tuple(figures), tables=tuple(tables))


def variant_provider(options) -> str:
    """Which of our providers a variant with these options ((name, value) pairs) runs."""
    return dict(options).get("provider", "flash_tt_attn")


def _parse_variants(c: _Checker, data, op: str) -> tuple:
    """``variants: {name: {option: value}}``: named flash_tt_attn variants, as (name, sorted pairs) tuples."""
    if not isinstance(data, dict):
        c.fail("variants", f"expected a mapping of names to switches, got {type(data).__name__}")
    out = []
    for name, options in data.items():
        where = f"variants.{name}"
        c.string(name, where)
        if name in PROVIDERS[op]:
            c.fail(where, f"a variant cannot take a provider's name ({name!r})")
        if not isinstance(options, dict) or not options:
            c.fail(where, "expected a non-empty mapping of flash_tt_attn switches to values")
        for option, value in options.items():
            if option == "provider":
                c.string(value, f"{where}.provider", OURS[op])
                continue
            if option not in VARIANT_OPTIONS:
                c.fail(f"{where}.{option}", f"unknown switch; expected one of {sorted(VARIANT_OPTIONS)}")
            want = VARIANT_OPTIONS[option]
            if type(value) is not want or (want is int and value <= 0):
                c.fail(f"{where}.{option}", f"expected {'a positive integer' if want is int else 'true or false'}, "
                       f"got {value!r}")
        out.append((name, tuple(sorted(options.items()))))
    return tuple(out)


def _parse_figures(c: _Checker, spec: Spec, items) -> list[FigureOut]:
    if not isinstance(items, list):
        c.fail("outputs.figures", f"expected a list, got {type(items).__name__}")
    out = []
    points = spec.points()
    for i, fig in enumerate(items):
        name = f"outputs.figures[{i}]"
        c.mapping(fig, name, _FIGURE_FIELDS, {"file", "metric"})
        file = c.string(fig["file"], f"{name}.file")
        if not file.endswith(".png") or "/" in file:
            c.fail(f"{name}.file", f"expected a plain file name ending in .png, got {file!r}")
        metric = c.string(fig["metric"], f"{name}.metric", [m for m in FIGURE_METRICS if m in spec.metrics])
        where = _check_where(c, fig.get("where", {}), f"{name}.where")
        chosen = [p for p in points if matches(p.fields(), where)]
        configs = {tuple(getattr(p, f) for f in CONFIG_FIELDS) for p in chosen}
        if len(configs) != 1:
            c.fail(f"{name}.where", f"must select the points of exactly one configuration (all but L and "
                                    f"provider fixed); it selects {len(configs)}")
        out.append(FigureOut(file, metric, where))
    return out


def _parse_tables(c: _Checker, spec: Spec, items) -> list[TableOut]:
    if not isinstance(items, list):
        c.fail("outputs.tables", f"expected a list, got {type(items).__name__}")
    out = []
    for i, tab in enumerate(items):
        name = f"outputs.tables[{i}]"
        c.mapping(tab, name, _TABLE_FIELDS, {"file", "kind"})
        file = c.string(tab["file"], f"{name}.file")
        if "/" in file or "." in file:
            c.fail(f"{name}.file", f"expected a file stem without extension or folder, got {file!r}")
        kind = c.string(tab["kind"], f"{name}.kind", TABLE_KINDS)
        if kind == "errors" and "error" not in spec.metrics:
            c.fail(f"{name}.kind", "an errors table needs metrics: [error]")
        metric = "latency"
        if kind == "errors" and "metric" in tab:
            c.fail(f"{name}.metric", "only for kinds results and speedup (an errors table shows the errors)")
        if kind in ("results", "speedup"):
            metric = c.string(tab.get("metric", "latency"), f"{name}.metric", TABLE_METRICS)
            if metric not in spec.metrics:
                c.fail(f"{name}.metric" if "metric" in tab else f"{name}.kind",
                       f"a {kind} table of {metric} needs the {metric} metric in metrics")
        where = _check_where(c, tab.get("where", {}), f"{name}.where")
        target = c.string(tab.get("target", "flash_tt_attn"), f"{name}.target", spec.providers)
        baselines = []
        if kind == "speedup":
            default = [p for p in ("naive", "flex") if p in spec.providers and p != target]
            baselines = c.str_list(tab.get("baselines", default), f"{name}.baselines", spec.providers)
        elif "baselines" in tab:
            c.fail(f"{name}.baselines", "only for kind: speedup")
        out.append(TableOut(file, kind, where, target, tuple(baselines), metric))
    return out


def load_spec(path) -> Spec:
    """Read and validate one spec file (raises :class:`SpecError` on any problem)."""
    import yaml  # noqa: PLC0415 (the bench extra; never imported by `import flash_tt_attn`)

    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    return parse_spec(data, path)


def resolve_spec(name: str, specs_dir="experiments") -> Path:
    """Map a spec id (``seed-fwd``) or a path (``experiments/seed-fwd.yaml``) to an existing file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise SpecError(f"{name}: no such spec file")
        return p
    p = Path(specs_dir) / f"{name}.yaml"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in Path(specs_dir).glob("*.yaml"))) or "none"
        raise SpecError(f"{name}: no spec {p} (known: {known})")
    return p


def all_spec_paths(specs_dir="experiments") -> list[Path]:
    """Every ``*.yaml`` spec in ``specs_dir``, sorted by name."""
    return sorted(Path(specs_dir).glob("*.yaml"))
