"""Benchmark specs: the shipped ones are valid; invalid ones fail naming the file and the field."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from flash_tt_attn.bench.spec import SpecError, all_spec_paths, load_spec, row_key  # noqa: E402

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
            "smoke", "ceilings"} <= ids
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
])
def test_invalid_spec_names_file_and_field(tmp_path, data, field):
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"field '{field}'" in msg


def test_not_yaml_or_not_a_mapping(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="t.yaml"):
        load_spec(path)
    path.write_text("id: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
