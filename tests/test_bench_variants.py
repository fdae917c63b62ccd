"""Spec variants: named flash_tt_attn A/B variants with some of its switches set (spec ``variants``)."""

import pytest
import torch
import yaml

from flash_tt_attn import ops
from flash_tt_attn.bench.measure import measure
from flash_tt_attn.bench.providers import get_provider
from flash_tt_attn.bench.spec import SpecError, load_spec

SPEC = {
    "id": "v",
    "description": "variants",
    "providers": ["flash_tt_attn", "splits3", "no_fast_exp2"],
    "variants": {"splits3": {"dbias_splits": 3}, "no_fast_exp2": {"fast_exp2": False}},
    "metrics": ["error"],
    "sweeps": [{"B": [1], "H": [1], "D": [16], "L": [5], "dtype": ["float32"], "mode": ["fwd_bwd"]}],
}


def load(tmp_path, data):
    path = tmp_path / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def test_a_variant_is_a_provider_whose_points_and_rows_carry_its_switches(tmp_path):
    spec = load(tmp_path, SPEC)
    points = spec.points()
    assert [p.provider for p in points] == ["flash_tt_attn", "splits3", "no_fast_exp2"]
    assert points[0].options is None and "options" not in points[0].fields()
    assert points[1].fields()["options"] == {"dbias_splits": 3}
    assert points[1].key() != points[0].key()


def test_a_variants_calls_run_under_its_switches_and_only_there(tmp_path):
    seen = []
    provider = get_provider("attention", "splits3", (("dbias_splits", 3),))
    base_bind = provider.base.bind
    provider.base.bind = lambda *args: (lambda: seen.append(ops.options().dbias_splits) or base_bind(*args)())
    q, k, v = (torch.randn(1, 1, 5, 5, 16) for _ in range(3))
    provider.bind(q, k, v, torch.randn(1, 1, 5, 5))()
    assert seen == [3] and ops.options().dbias_splits is None


def test_a_variant_measures_against_fp64_like_the_library(tmp_path):
    """Three row splits change the bias gradient's summation order, not its accuracy."""
    spec = load(tmp_path, SPEC)
    base, splits3 = spec.points()[:2]
    errors = [measure(p, spec.metrics, torch.device("cpu"), 0, 0) for p in (base, splits3)]
    for name in ("err_o", "err_dq", "err_dk", "err_dv", "err_dbias"):
        assert errors[1][name] < 1e-5 and errors[0][name] < 1e-5, name


def test_a_variant_may_run_another_of_our_providers(tmp_path):
    """A variant naming ``provider`` runs that provider (here lengths= of L/2 on odd items) under its switches;
    its rows carry the provider with the switches, and a padded variant cannot be asked for errors."""
    data = dict(SPEC, metrics=["latency"], providers=["flash_tt_attn_lengths", "padded_uncapped"],
                variants={"padded_uncapped": {"provider": "flash_tt_attn_lengths", "register_caps": False}})
    point = load(tmp_path, data).points()[1]
    assert point.fields()["options"] == {"provider": "flash_tt_attn_lengths", "register_caps": False}
    provider = get_provider("attention", point.provider, point.options)
    assert provider.base.name == "flash_tt_attn_lengths" and provider.options == {"register_caps": False}
    seen = []
    base_bind = provider.base.bind
    provider.base.bind = lambda *args: (lambda: seen.append(ops.options().register_caps) or base_bind(*args)())
    q, k, v = (torch.randn(2, 1, 6, 6, 16) for _ in range(3))
    out = provider.bind(q, k, v, torch.randn(2, 1, 6, 6))()
    assert seen == [False] and ops.options().register_caps
    assert bool((out[1, :, 3:] == 0).all()) and bool((out[1, :, :3, 3:] == 0).all())  # item 1: 3 of 6 residues
    with pytest.raises(SpecError, match=r"\['padded_uncapped'\] leave a padded tail out"):
        load(tmp_path, dict(data, metrics=["error"], providers=["padded_uncapped"]))


@pytest.mark.parametrize("variants,message", [
    ({"x": {"provider": "flex", "fast_exp2": False}}, "variants.x.provider"),
    ({"naive": {"fast_exp2": False}}, "cannot take a provider's name"),
    ({"x": {"warp_count": 4}}, "unknown switch"),
    ({"x": {"fast_exp2": "no"}}, "true or false"),
    ({"x": {"dbias_splits": 0}}, "positive integer"),
    ({"x": {}}, "non-empty mapping"),
    (["x"], "expected a mapping"),
])
def test_invalid_variants_name_the_field(tmp_path, variants, message):
    data = dict(SPEC, variants=variants, providers=["flash_tt_attn"])
    with pytest.raises(SpecError, match=message):
        load(tmp_path, data)
