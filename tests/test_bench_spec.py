"""Benchmark specs: the shipped ones are valid; invalid ones fail naming the file and the field."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from flash_tt_attn.bench.spec import SpecError, all_spec_paths, load_spec, matches, row_key  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

GOOD = {
    "id": "t",
    "description": "a test spec",
    "providers": ["flash_tt_attn", "naive"],
    "metrics": ["latency", "memory"],
    "sweeps": [{"B": [1], "H": [2], "D": [16], "L": [4, 8], "dtype": ["float32"], "mode": ["fwd", "fwd_bwd"]}],
    "outputs": {"figures": [{"file": "t-fwd.png", "metric": "latency", "where": {"mode": "fwd"}}],
                "tables": [{"file": "t", "kind": "results"}]},
}


def write(tmp_path, data, name="t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def changed(**top):
    data = {k: (v.copy() if isinstance(v, dict) else v) for k, v in GOOD.items()}
    data["sweeps"] = [dict(GOOD["sweeps"][0])]
    data.update(top)
    return data


def test_shipped_specs_are_valid():
    paths = all_spec_paths(EXPERIMENTS)
    ids = {p.stem for p in paths}
    assert {"seed-fwd", "seed-fwd_bwd", "alphafold", "targets", "headdims", "long", "block", "correctness",
            "smoke", "ceilings", "training"} <= ids
    specs = {s.id: s for s in map(load_spec, paths)}
    assert {f.file for f in specs["seed-fwd"].figures} == {
        "fused-attention-batch4-head8-d32-fwd-latency.png", "fused-attention-batch4-head8-d32-fwd-memory.png"}
    assert {f.file for f in specs["seed-fwd_bwd"].figures} == {
        "fused-attention-batch4-head8-d32-fwd_bwd-latency.png", "fused-attention-batch4-head8-d32-fwd_bwd-memory.png"}
    assert specs["block"].op == "triangle_block"
    assert specs["correctness"].metrics == ("error",)
    assert set(specs["ceilings"].providers) >= {"flex_plain", "sdpa_cudnn_plain"}
    outputs = [o.file for s in specs.values() for o in (*s.figures, *s.tables)]
    assert len(outputs) == len(set(outputs)), "two specs claim one output"


def test_training_spec_expands_to_its_sixty_five_points():
    """50 points of the five providers (L x mode x provider) and 5 of each folded_* variant, whose forward is
    the default's (they change the backward only)."""
    spec = load_spec(EXPERIMENTS / "training.yaml")
    pts = spec.points()
    assert len(pts) == 5 * 2 * 5 + 3 * 5
    assert {p.L for p in pts} == {128, 256, 384, 512, 768} and {p.mode for p in pts} == {"fwd", "fwd_bwd"}
    assert {(p.B, p.H, p.D, p.dtype) for p in pts} == {(1, 4, 32, "bfloat16")}
    assert spec.providers == ("flash_tt_attn", "flex", "cueq", "trifast", "sdpa", "folded_split_sum",
                              "folded_bias_copy", "folded_launches")
    folded = {(p.provider, p.mode, p.options) for p in pts if p.provider.startswith("folded_")}
    assert folded == {(name, "fwd_bwd", options) for name, options in (
        ("folded_split_sum", (("fold_split_sum", True),)), ("folded_bias_copy", (("fold_bias_copy", True),)),
        ("folded_launches", (("fold_bias_copy", True), ("fold_split_sum", True))))}  # sorted by name
    assert set(spec.metrics) == {"latency", "host", "graph", "memory"}
    speedups = {(t.metric, t.target, t.baselines) for t in spec.tables if t.kind == "speedup"}
    assert {m for m, _, _ in speedups} == {"latency", "host", "graph"}
    assert all({"flex", "cueq", "trifast"} <= set(b) for _, target, b in speedups if target == "flash_tt_attn")
    assert {(m, b) for m, target, b in speedups if target == "folded_launches"} == {
        (m, ("flash_tt_attn", "folded_split_sum", "folded_bias_copy")) for m in ("latency", "host", "graph")}
    assert {(f.metric, f.where["mode"]) for f in spec.figures} >= {
        (m, mode) for m in ("latency", "graph") for mode in ("fwd", "fwd_bwd")}


def test_block_spec_has_both_nodes_and_old_rows_count_as_starting():
    spec = load_spec(EXPERIMENTS / "block.yaml")
    pts = spec.points()
    variants = ("qkv_copies", "torch_layer_norm", "fused_projections", "heads_first_output")
    main = [p for p in pts if p.provider not in variants]
    assert len(main) == 5 * 2 * 2 * 2  # L x node x mode x provider
    variant = [p for p in pts if p.provider in variants]  # the training crops, starting node
    assert len(variant) == 3 * 4 * 2 + 4 and {p.node for p in variant} == {"starting"}
    assert {p.mode for p in variant if p.provider == "heads_first_output"} == {"fwd"}  # a no-grad switch
    assert {p.node for p in pts} == {"starting", "ending"} and {256, 384} <= {p.L for p in pts}
    assert {"host", "graph"} <= set(spec.metrics)
    start = next(p for p in pts if p.node == "starting")
    old_row = {k: v for k, v in start.fields().items() if k != "node"}  # written before the node axis
    assert "node" in start.fields() and row_key(old_row) == start.key()
    end = next(p for p in pts if p.node == "ending" and p.provider == start.provider and p.L == start.L
               and p.mode == start.mode)
    assert row_key(old_row) != end.key()
    assert matches(old_row, {"node": "starting"}) and not matches(old_row, {"node": "ending"})
    # every figure picks one node: the four that existed before the axis keep their names, for starting
    starting_figs = {f.file for f in spec.figures if f.where.get("node") == "starting"}
    assert {"triangle-block-c128-head4-d32-bf16-fwd-latency.png",
            "triangle-block-c128-head4-d32-bf16-fwd_bwd-memory.png"} <= starting_figs
    assert any(f.where.get("node") == "ending" for f in spec.figures)


def test_points_expand_the_cross_product_and_match_row_keys(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    pts = spec.points()
    assert len(pts) == 2 * 2 * 2  # L x mode x provider
    row = {**pts[0].fields(), "status": "ok"}
    assert row_key(row) == pts[0].key()


@pytest.mark.parametrize("data, field", [
    pytest.param(changed(colour="red"), "colour", id="unknown-top-field"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "Lmax": [4]}]), "sweeps[0].Lmax", id="unknown-sweep-field"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "L": 64}]), "sweeps[0].L", id="scalar-not-list"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "L": ["64"]}]), "sweeps[0].L[0]", id="string-not-int"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "L": []}]), "sweeps[0].L", id="empty-axis"),
    pytest.param(changed(sweeps=[]), "sweeps", id="empty-sweeps"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "dtype": ["fp8"]}]), "sweeps[0].dtype[0]", id="bad-dtype"),
    pytest.param(changed(providers=["magic"]), "providers[0]", id="unknown-provider"),
    pytest.param(changed(metrics="latency"), "metrics", id="metrics-not-list"),
    pytest.param(changed(timing={"warmup_ms": "fast"}), "timing.warmup_ms", id="timing-type"),
    pytest.param(changed(id="other"), "id", id="id-not-stem"),
    pytest.param(changed(description=None), "description", id="description-null"),
    pytest.param(changed(sweeps=[{k: v for k, v in GOOD["sweeps"][0].items() if k != "mode"}]), "sweeps[0].mode",
                 id="missing-axis"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "c_in": [8]}]), "sweeps[0].c_in", id="c_in-for-attention"),
    pytest.param(changed(op="triangle_block"), "sweeps[0].c_in", id="block-needs-c_in"),
    pytest.param(changed(outputs={"figures": [{"file": "x.png", "metric": "latency"}]}), "outputs.figures[0].where",
                 id="figure-spans-configs"),
    pytest.param(changed(outputs={"tables": [{"file": "x", "kind": "errors"}]}), "outputs.tables[0].kind",
                 id="errors-table-needs-error-metric"),
    pytest.param(changed(outputs={"plots": []}), "outputs.plots", id="unknown-output-field"),
    pytest.param(changed(providers=["flash_tt_attn", "flex_plain"], metrics=["error"], outputs={}), "providers",
                 id="bias-free-ceiling-has-no-errors"),
    pytest.param(changed(metrics=["latency", "speed"]), "metrics[1]", id="unknown-metric"),
    pytest.param(changed(metrics=["latency", "host", "latency"]), "metrics", id="metric-twice"),
    pytest.param(changed(metrics=["error", "host"], outputs={}), "metrics", id="error-with-host"),
    pytest.param(changed(outputs={"tables": [{"file": "x", "kind": "speedup", "metric": "graph"}]}),
                 "outputs.tables[0].metric", id="graph-table-needs-graph-metric"),
    pytest.param(changed(metrics=["latency", "graph"], outputs={"tables": [{"file": "x", "kind": "results",
                                                                            "metric": "memory"}]}),
                 "outputs.tables[0].metric", id="table-metric-not-a-time"),
    pytest.param(changed(metrics=["error"], outputs={"tables": [{"file": "x", "kind": "errors", "metric": "host"}]}),
                 "outputs.tables[0].metric", id="errors-table-has-no-metric"),
    pytest.param(changed(outputs={"figures": [{"file": "x.png", "metric": "host", "where": {"mode": "fwd"}}]}),
                 "outputs.figures[0].metric", id="host-figure-needs-host-metric"),
    pytest.param(changed(sweeps=[{**GOOD["sweeps"][0], "node": ["ending"]}]), "sweeps[0].node",
                 id="node-for-attention"),
    pytest.param(changed(op="triangle_block", outputs={},
                         sweeps=[{**GOOD["sweeps"][0], "c_in": [8], "node": ["middle"]}]), "sweeps[0].node[0]",
                 id="unknown-node"),
])
def test_invalid_spec_names_file_and_field(tmp_path, data, field):
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"field '{field}'" in msg


def test_metrics_host_and_graph_are_accepted_with_their_tables_and_figures(tmp_path):
    data = changed(metrics=["latency", "memory", "host", "graph"], outputs={
        "figures": [{"file": f"t-{m}.png", "metric": m, "where": {"mode": "fwd_bwd"}}
                    for m in ("latency", "memory", "host", "graph")],
        "tables": [{"file": "t", "kind": "results"}, {"file": "t-graph", "kind": "results", "metric": "graph"},
                   {"file": "t-host-speedup", "kind": "speedup", "metric": "host", "baselines": ["naive"]}]})
    spec = load_spec(write(tmp_path, data))
    assert spec.metrics == ("latency", "memory", "host", "graph")
    assert [t.metric for t in spec.tables] == ["latency", "graph", "host"]
    assert [f.metric for f in spec.figures] == ["latency", "memory", "host", "graph"]
    # a spec measuring only the newer metrics needs no latency for their tables
    only = changed(metrics=["graph"], outputs={"tables": [{"file": "g", "kind": "speedup", "metric": "graph"}]})
    assert load_spec(write(tmp_path, only)).tables[0].metric == "graph"


def test_block_node_axis_expands_and_labels(tmp_path):
    data = changed(op="triangle_block", outputs={},
                   sweeps=[{**GOOD["sweeps"][0], "c_in": [8], "node": ["starting", "ending"]}])
    pts = load_spec(write(tmp_path, data)).points()
    assert len(pts) == 2 * 2 * 2 * 2  # L x mode x provider x node
    assert sum(p.node == "ending" for p in pts) == 8 and all("-ending-" in p.label() for p in pts
                                                             if p.node == "ending")
    no_axis = changed(op="triangle_block", outputs={}, sweeps=[{**GOOD["sweeps"][0], "c_in": [8]}])
    assert {p.node for p in load_spec(write(tmp_path, no_axis)).points()} == {"starting"}
    assert all("node" not in p.fields() for p in load_spec(write(tmp_path, GOOD)).points())  # attention: none


def test_not_yaml_or_not_a_mapping(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="t.yaml"):
        load_spec(path)
    path.write_text("id: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_long_inference_spec_sweeps_its_own_providers():
    spec = load_spec(EXPERIMENTS / "long-inference.yaml")
    assert spec.op == "triangle_block" and set(spec.metrics) == {"latency", "memory"}
    pts = spec.points()
    long = [p for p in pts if p.B == 1]
    assert {p.L for p in long} == {2048, 4096, 6144, 8192} and {p.mode for p in long} == {"fwd"}
    assert {(p.c_in, p.H, p.D, p.dtype) for p in pts} == {(128, 4, 32, "bfloat16")}
    starting = {p.provider for p in long if p.node == "starting"}
    assert starting == {"flash_tt_attn", "flash_tt_attn_whole", "naive_chunk4", "naive_chunk128", "cueq"}
    assert {p.provider for p in long if p.node == "ending"} == {"flash_tt_attn", "flash_tt_attn_whole", "cueq"}
    padding = [p for p in pts if p.B == 2]
    assert {p.provider for p in padding} == {"flash_tt_attn", "flash_tt_attn_lengths", "flash_tt_attn_host_lengths",
                                            "fused_projections", "lengths_fused_projections", "heads_first_output",
                                            "host_lengths_heads_first_output"}
    assert {p.mode for p in padding if p.provider == "flash_tt_attn_host_lengths"} == {"fwd"}
    assert {p.mode for p in padding} == {"fwd", "fwd_bwd"}
    assert {p.mode for p in padding if "fused" in p.provider} == {"fwd"}
    switches = {"block_fused_projections": True}
    assert {p.provider: dict(p.options or {}) for p in padding if "fused" in p.provider} == {
        "fused_projections": switches, "lengths_fused_projections": {**switches, "provider": "flash_tt_attn_lengths"}}
    heads_first = {"block_heads_last_output": False}
    assert {p.provider: dict(p.options or {}) for p in padding if "heads_first" in p.provider} == {
        "heads_first_output": heads_first,
        "host_lengths_heads_first_output": {**heads_first, "provider": "flash_tt_attn_host_lengths"}}
    assert {p.mode for p in padding if "heads_first" in p.provider} == {"fwd"}
    assert len(pts) == 4 * 5 + 4 * 3 + 3 * 3 + 3 * 2 + 3 * 2 + 3 * 2
    padding_speedup = next(t for t in spec.tables if t.file == "long-inference-padding-speedup")
    assert padding_speedup.target == "flash_tt_attn_lengths" and padding_speedup.baselines == ("flash_tt_attn",)


def test_padding_spec_compares_the_padded_batch_with_both_full_length_calls_capped_and_not():
    """Each lengths= provider beside its uncapped variant (the same call without the forward's register cap),
    and the unpadded call at an L the tiles do not divide beside its uncapped variant and the one that reads
    the bias masked (unpadded_bias, the default before v27), and the backward reading a padded copy too
    (padded_bias_backward)."""
    spec = load_spec(EXPERIMENTS / "padding.yaml")
    assert spec.op == "attention" and spec.metrics == ("latency",)
    pts = spec.points()
    assert {(p.B, p.H, p.D, p.dtype) for p in pts} == {(2, 4, 32, "bfloat16")}
    runs = {p.provider: dict(p.options or {}) for p in pts}
    assert runs == {"flash_tt_attn": {}, "flash_tt_attn_lengths": {}, "flash_tt_attn_lengths_full": {},
                    "lengths_uncapped": {"provider": "flash_tt_attn_lengths", "register_caps": False},
                    "lengths_full_uncapped": {"provider": "flash_tt_attn_lengths_full", "register_caps": False},
                    "uncapped": {"register_caps": False},
                    "lengths_end_tile": {"provider": "flash_tt_attn_lengths", "end_tile_select": True},
                    "lengths_full_end_tile": {"provider": "flash_tt_attn_lengths_full", "end_tile_select": True},
                    "end_tile": {"end_tile_select": True}, "padded_bias": {"pad_bias_tiles": True},
                    "padded_bias_end_tile": {"pad_bias_tiles": True, "end_tile_select": True},
                    "unpadded_bias": {"pad_bias_tiles": False},
                    "padded_bias_backward": {"pad_bias_tiles_backward": True}}
    odd = ("uncapped", "end_tile", "padded_bias", "padded_bias_end_tile", "unpadded_bias", "padded_bias_backward")
    assert {p.L for p in pts if p.provider in odd} == {1000} and 1000 % 64
    assert {p.mode for p in pts if p.provider == "padded_bias_backward"} == {"fwd_bwd"}  # the forward is unchanged
    speedup = next(t for t in spec.tables if t.file == "padding-speedup")
    assert speedup.target == "flash_tt_attn_lengths"
    assert speedup.baselines == ("flash_tt_attn", "flash_tt_attn_lengths_full", "lengths_uncapped")


def test_padded_providers_cannot_be_asked_for_errors(tmp_path):
    """A padded batch's padded pairs are 0 by design: its errors against the unpadded reference would mean
    nothing; the full-length lengths= call computes the unpadded function and may be checked."""
    with pytest.raises(SpecError, match="padded tail"):
        load_spec(write(tmp_path, changed(providers=["flash_tt_attn_lengths"], metrics=["error"], outputs={})))
    spec = load_spec(write(tmp_path, changed(providers=["flash_tt_attn_lengths_full"], metrics=["error"],
                                             outputs={})))
    assert spec.providers == ("flash_tt_attn_lengths_full",)


def test_sweep_providers_pick_a_subset_in_the_spec_order(tmp_path):
    data = changed(sweeps=[{**GOOD["sweeps"][0], "providers": ["naive"]}, {**GOOD["sweeps"][0], "B": [2]}],
                   outputs={})
    pts = load_spec(write(tmp_path, data)).points()
    assert {p.provider for p in pts if p.B == 1} == {"naive"}
    assert [p.provider for p in pts if p.B == 2][:2] == ["flash_tt_attn", "naive"]
    bad = changed(sweeps=[{**GOOD["sweeps"][0], "providers": ["sdpa"]}])  # not among the spec's providers
    with pytest.raises(SpecError, match=r"field 'sweeps\[0\]\.providers\[0\]'"):
        load_spec(write(tmp_path, bad))
    where = changed(outputs={"tables": [{"file": "x", "kind": "results", "where": {"providers": "naive"}}]})
    with pytest.raises(SpecError, match="unknown field"):
        load_spec(write(tmp_path, where))
