"""Packaging: a light import, one version everywhere, and a clear refusal of too-old torch/triton."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flash_tt_attn
from flash_tt_attn import _compat

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_pull_in_the_bench_stack():
    """`import flash_tt_attn` must not import the benchmark/plotting deps (they are the `bench` extra)."""
    heavy = ("pandas", "seaborn", "matplotlib", "yaml")  # not tqdm: torch.hub imports it when it is installed
    code = (
        "import sys, flash_tt_attn; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import flash_tt_attn imported: {result.stdout.strip()}"


def test_a_cpu_block_without_the_interpreter_imports_no_launchers():
    """TriangleAttention on a CPU without TRITON_INTERPRET runs the PyTorch paths: its switches are read without
    importing flash_tt_attn.ops (which imports Triton and fixes whether its interpreter runs)."""
    code = (
        "import sys, torch, flash_tt_attn as f; m = f.TriangleAttention(16, 8, 2); m(torch.randn(1, 5, 5, 16)); "
        "print(sorted(n for n in ('flash_tt_attn.ops', 'triton') if n in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_version_is_one_string_everywhere():
    version = flash_tt_attn.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    pyproject = (ROOT / "pyproject.toml").read_text()
    # pyproject reads the version from _version.py (dynamic), so there is one place to bump it.
    assert re.search(r'^dynamic = \[.*"version".*\]', pyproject, re.M), "pyproject.toml: version should be dynamic"
    assert 'version = { attr = "flash_tt_attn._version.__version__" }' in pyproject
    cff = re.search(r'^version:\s*"?([^"\s]+)"?\s*$', (ROOT / "CITATION.cff").read_text(), re.M)
    assert cff is not None and cff.group(1) == version, "CITATION.cff's version differs from flash_tt_attn.__version__"


def test_installed_metadata_matches_version():
    from importlib import metadata

    try:
        installed = metadata.version("flash-tt-attn")
    except metadata.PackageNotFoundError:
        pytest.skip("flash-tt-attn is not installed (running from a bare checkout)")
    assert installed == flash_tt_attn.__version__


def test_minimums_match_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*)\]", pyproject, re.M).group(1)
    for name, minimum in (("torch", _compat.MIN_TORCH), ("triton", _compat.MIN_TRITON)):
        floor = re.search(rf'"{name}>=([\d.]+)"', deps)
        assert floor is not None, f"pyproject.toml declares no {name}>= floor"
        assert _compat.parse_version(floor.group(1)) == minimum, (name, floor.group(1), minimum)


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("2.11.0", (2, 11, 0), id="plain"),
        pytest.param("2.11.0+cu130", (2, 11, 0), id="local-cuda"),
        pytest.param("2.13.0+cpu", (2, 13, 0), id="local-cpu"),
        pytest.param("2.12.0.dev20260101+cu130", (2, 12, 0), id="nightly"),
        pytest.param("3.6.0rc1", (3, 6, 0), id="rc"),
        pytest.param("3.6", (3, 6), id="two-parts"),
        pytest.param("3.0.0+git1a2b3c4", (3, 0, 0), id="git"),
    ],
)
def test_parse_version(text, expected):
    assert _compat.parse_version(text) == expected


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError):
        _compat.parse_version("unknown")


@pytest.mark.parametrize(
    "installed",
    ["2.11.0", "2.11", "2.11.0+cu130", "2.11.0rc1", "2.13.0+cpu", "3.0.0", "10.0"],
)
def test_new_enough_torch_passes(installed):
    _compat.check_version("torch", installed, (2, 11))


@pytest.mark.parametrize("installed", ["2.10.1", "2.9.0+cu128", "1.13.1", "2.1"])
def test_too_old_torch_raises_a_clear_import_error(installed):
    with pytest.raises(ImportError) as info:
        _compat.check_version("torch", installed, (2, 11))
    message = str(info.value)
    assert "torch >= 2.11" in message and installed in message
    assert "pip install -U" in message and "FLASH_TT_ATTN_SKIP_VERSION_CHECK" in message


def test_too_old_triton_raises():
    with pytest.raises(ImportError, match=r"triton >= 3\.6, but triton 3\.5\.1 is installed"):
        _compat.check_version("triton", "3.5.1", _compat.MIN_TRITON)
    _compat.check_version("triton", "3.6.0", _compat.MIN_TRITON)


def test_unparsable_version_is_not_an_error():
    _compat.check_version("triton", "unknown", _compat.MIN_TRITON)


def test_installed_versions_pass_the_check():
    _compat.check_versions()
