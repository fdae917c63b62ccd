"""A newcomer's first hour on a CPU-only machine (issue 22): install as the README says, run its CPU
example on both CPU paths, run every nox session, and get one clear line whenever something is missing.

The tests marked ``slow`` build virtualenvs and run nox sessions (a few minutes in all; they are part of
``nox -s tests``, and ``-m 'not slow'`` leaves them out). They copy the files they need into a temporary
directory, so nothing they run writes into this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flash_tt_attn import attention
from flash_tt_attn.modules import TriangleAttention, TriangleAttentionReference
from flash_tt_attn.ops import interpreter_enabled
from flash_tt_attn.reference import attention_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HAS_CUDA = torch.cuda.is_available()
# The CPU torch that `nox -s tests` installs (noxfile.py), e.g. "torch==2.13.0".
CPU_TORCH = re.search(r'^CPU_TORCH = "(.+)"', (ROOT / "noxfile.py").read_text(), re.M).group(1)

# bf16's unit roundoff: rounding a value to bf16 (8 significant bits) moves it by at most 2^-8 of itself.
BF16_ROUNDING = 2.0**-8
# Relative error (norm of the difference / norm of the fp64 value) of the README's CPU example per dtype. fp16 and
# fp32 as in tests/test_attention.py. bf16: both CPU paths compute in fp32 (about 1e-6) and round the output to bf16.
EXAMPLE_TOL = {"float16": 3e-3, "bfloat16": BF16_ROUNDING + 1e-5, "float32": 2e-5}


def _interpreted_cpu():
    if HAS_CUDA:
        pytest.skip("the CPU interpreter's bf16 path; bf16 on a GPU is covered by tests/test_gpu_*.py")
    if not interpreter_enabled():
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (conftest.py does it without a GPU)")


# ----------------------------------------------------------------------------- bf16 under the interpreter


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_bf16_under_the_interpreter_matches_fp64(masked):
    """Triton's interpreter multiplies bf16 bit patterns as integers in tl.dot (every output element wrong, silently);
    attention() runs those calls on fp32 copies, so output and gradients are the fp64 values rounded to bf16."""
    _interpreted_cpu()
    B, H, L, D = 1, 2, 9, 16
    q, k, v = (torch.randn(B, H, L, L, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, L, L, dtype=torch.bfloat16, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(B, L, L) > 0.3
        mask[0, 0] = False  # a row with no key: 0 output, 0 gradients
    dout = torch.randn(B, H, L, L, D, dtype=torch.bfloat16)
    out = attention(q, k, v, bias, 0.3, mask)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = attention_reference(*leaves, scale=0.3, mask=mask)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), (ref, *ref_grads), strict=True):
        assert got.dtype == torch.bfloat16, name
        err = (got.double() - want).abs()
        # Elementwise: bf16 rounding of the result, plus the fp32 kernels' error relative to the tensor's scale.
        bound = BF16_ROUNDING * want.abs() + 1e-4 * want.abs().max().clamp_min(1.0)
        assert (err <= bound).all(), f"{name}: max error {err.max():.3e}, worst excess {(err - bound).max():.3e}"


def test_bf16_module_under_the_interpreter():
    """The AlphaFold block (modules.TriangleAttention calls attention()) in bf16 on the interpreter: its error against
    the fp64 block is at most twice that of the same block in plain PyTorch bf16."""
    _interpreted_cpu()
    fused = TriangleAttention(c_in=8, c_hidden=16, no_heads=2)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0.0, 0.5)
    plain = TriangleAttentionReference(c_in=8, c_hidden=16, no_heads=2)
    plain.load_state_dict(fused.state_dict())
    exact = TriangleAttentionReference(c_in=8, c_hidden=16, no_heads=2).double()
    exact.load_state_dict(fused.state_dict())
    x = torch.randn(1, 7, 7, 8)
    mask = torch.rand(1, 7, 7) > 0.2
    want = exact(x.double(), mask)
    ours = fused.bfloat16()(x.bfloat16(), mask)
    theirs = plain.bfloat16()(x.bfloat16(), mask)
    assert ours.dtype == torch.bfloat16
    err_ours = ((ours.double() - want).norm() / want.norm()).item()
    err_theirs = ((theirs.double() - want).norm() / want.norm()).item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


# ----------------------------------------------------------------------------- one line for what is missing


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, **env}, timeout=300)


def test_interpreter_without_numpy_names_numpy():
    """Triton's interpreter imports numpy; without it, attention() says what to install instead of failing deep
    inside Triton."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"  # as if numpy were not installed
        "import torch; from flash_tt_attn import attention\n"
        "q = torch.randn(1, 1, 4, 4, 16)\n"
        "try:\n"
        "    attention(q, q, q, torch.randn(1, 1, 4, 4))\n"
        "except ModuleNotFoundError as e:\n"
        "    print('ERROR', e.name, e)\n"
    )
    result = _python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "ERROR numpy" in result.stdout and "pip install numpy" in result.stdout, result.stdout


@pytest.mark.parametrize("module", ["yaml", "pandas"])
def test_bench_without_its_extra_says_which_extra(module, tmp_path):
    """`python -m flash_tt_attn.bench validate` (yaml) and `figures` (pandas) without the `bench` extra: one line
    on stderr naming the extra, exit code 1, no traceback."""
    command = ["validate"]
    if module == "pandas":
        shutil.copy(ROOT / "experiments" / "smoke.yaml", tmp_path)
        command = ["figures", "--specs", str(tmp_path), "--out", str(tmp_path / "out")]
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['bench', *{command!r}]\n"
            "runpy.run_module('flash_tt_attn.bench', run_name='__main__')")
    result = _python(code)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr
    assert module in errors[0] and "pip install 'flash-tt-attn[bench]'" in errors[0], errors[0]


# ----------------------------------------------------------------------------- the README


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def readme_cpu_example() -> str:
    blocks = [b for b in _code_blocks("python") if 'device="cpu"' in b]
    assert len(blocks) == 1, "the README should hold one CPU example (a python block with device=\"cpu\")"
    assert "dtype = torch.float32" in blocks[0], "the CPU example picks its dtype on one line: dtype = torch.float32"
    return blocks[0]


def test_readme_first_example_gives_both_devices():
    python = _code_blocks("python")
    assert 'device="cuda"' in python[0]
    assert 'device="cpu"' in python[1], "the CPU example should follow the CUDA one"


def test_readme_install_says_how_to_get_the_cpu_build():
    install = README[README.index("Install:"):README.index("## Results")]
    assert "download.pytorch.org/whl/cpu" in install


def test_readme_quotes_extras_and_has_a_bibtex_key():
    assert not re.search(r"pip install [^`'\"\n]*\.\[", README), "quote extras: pip install '.[bench]' (zsh globs [])"
    assert "'.[bench]'" in README and "plotting deps" not in README
    bibtex = _code_blocks("bibtex")
    assert len(bibtex) == 1 and "YourReferenceHere" not in bibtex[0]
    assert re.match(r"@misc\{flash_tt_attn,", bibtex[0])


def test_every_pytest_marker_is_used():
    declared = re.findall(r'^\s*"(\w+): ', (ROOT / "pyproject.toml").read_text().split("markers = [")[1], re.M)
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    for marker in declared:
        assert f"pytest.mark.{marker}" in sources, f"marker {marker} is declared in pyproject.toml but never used"


# ----------------------------------------------------------------------------- fresh install (slow)


def _run(cmd, *, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
                            check=False)
    return result


def _clean_env(**extra) -> dict:
    """This process's environment without what `nox -s tests` adds (a newcomer's shell has none of it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "VIRTUAL_ENV", "NOX_CURRENT_SESSION", "PYTHONPATH")}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:  # drop the test venv's bin from PATH
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(venv))
    env.update(extra)
    return env


EXAMPLE_CHECK = """
import json, sys, torch
from flash_tt_attn.reference import attention_reference
example = sys.argv[1]
results = []
for name in ("float16", "bfloat16", "float32"):
    torch.manual_seed(0)
    scope = {}
    exec(example.replace("dtype = torch.float32", f"dtype = torch.{name}"), scope)
    q, k, v, bias, output = (scope[n] for n in ("q", "k", "v", "bias", "output"))
    want = attention_reference(q.double(), k.double(), v.double(), bias.double())
    err = ((output.double() - want).norm() / want.norm()).item()
    results.append({"dtype": name, "out_dtype": str(output.dtype), "finite": bool(output.isfinite().all()),
                    "err": err})
print(json.dumps(results))
"""


@pytest.mark.slow
def test_fresh_cpu_install_runs_the_readme_example(tmp_path):
    """A fresh virtualenv, torch's CPU build first, then `pip install .` (README: Install); then the README's CPU
    example in fp16, bf16 and fp32, with TRITON_INTERPRET=1 and without, each against the fp64 reference."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "flash_tt_attn", source / "flash_tt_attn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    env = _clean_env()
    result = _run([sys.executable, "-m", "venv", venv], env=env)
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    # The README's `pip install torch --index-url https://download.pytorch.org/whl/cpu`, through this machine's pip
    # configuration as `nox -s tests` does it (a local CPU wheel, or PIP_EXTRA_INDEX_URL pointing at that index).
    for step in ([CPU_TORCH], [source]):
        result = _run([python, "-m", "pip", "install", "--quiet", *step], env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    installed = _run([python, "-m", "pip", "list", "--format=json"], env=env)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "flash-tt-attn" in names and "numpy" in names
    assert not [n for n in names if n.startswith("nvidia-")], f"CUDA packages were installed: {sorted(names)}"

    example = readme_cpu_example()
    for interpret in ("1", "0"):
        result = _run([python, "-c", EXAMPLE_CHECK, example], cwd=tmp_path, env=_clean_env(TRITON_INTERPRET=interpret))
        assert result.returncode == 0, f"TRITON_INTERPRET={interpret}: {result.stderr[-3000:]}"
        for row in json.loads(result.stdout.strip().splitlines()[-1]):
            where = f"TRITON_INTERPRET={interpret} {row['dtype']}"
            assert row["out_dtype"] == f"torch.{row['dtype']}", where
            assert row["finite"], where
            assert row["err"] <= EXAMPLE_TOL[row["dtype"]], f"{where}: relative error {row['err']:.2e}"


# ----------------------------------------------------------------------------- every nox session (slow)

GPU_ONLY = "this session needs a CUDA GPU"


def _nox_sessions() -> list[str]:
    """Every session `nox -l` lists (`--json` lists only the default ones)."""
    result = _run([sys.executable, "-m", "nox", "-f", ROOT / "noxfile.py", "-l"], env=_clean_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    return re.findall(r"^[*-] (\S+) -> ", result.stdout, re.M)


# Each session as it runs on a CPU-only machine, with tiny inputs: (nox -s NAME, posargs, "ok" or GPU_ONLY).
# {tmp} is a scratch directory, {logs} one bench log directory shared by the bench and figures cases.
SESSION_CASES = [
    pytest.param("tests", ["tests/test_packaging.py", "-k", "version"], "ok", id="tests"),
    pytest.param("gpu_tests", [], GPU_ONLY, id="gpu_tests"),
    pytest.param("gradcheck", [], "ok", id="gradcheck"),
    pytest.param("bench", ["smoke"], GPU_ONLY, id="bench"),
    pytest.param("bench", ["smoke", "--dry-run", "--logs", "{logs}"], "ok", id="bench-dry-run"),
    pytest.param("bench", ["smoke", "--device", "cpu", "--logs", "{logs}"], "ok", id="bench-cpu"),
    pytest.param("figures", ["--specs", "{tmp}/specs", "--logs", "experiments/logs", "--out", "{tmp}/figures"], "ok",
                 id="figures"),
    pytest.param("lint", [], "ok", id="lint"),
    pytest.param("docker_lint", [], "ok", id="docker_lint"),
    pytest.param("cff", [], "ok", id="cff"),
    pytest.param("lock", [], "ok", id="lock"),
    pytest.param("relock", [], "ok", id="relock"),
]


@pytest.fixture(scope="module")
def nox_checkout(tmp_path_factory):
    """A copy of the checkout (so relock, bench and figures write there, not here) and one nox envdir for it."""
    base = tmp_path_factory.mktemp("nox")
    copy = base / "checkout"
    # The files git tracks, as they are in this working tree: what a fresh clone holds (plus local edits).
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if tracked.returncode == 0:
        for name in tracked.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, copy / name)
    else:  # not a git checkout (an unpacked sdist): everything but caches and build outputs
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".nox", "build", "dist", "*.egg-info", "__pycache__",
                                                                  ".pytest_cache", ".ruff_cache", ".hypothesis"))
    (base / "specs").mkdir()
    shutil.copy(ROOT / "experiments" / "smoke.yaml", base / "specs")
    return base, copy


@pytest.mark.slow
def test_the_cases_cover_every_nox_session():
    covered = {p.values[0] for p in SESSION_CASES}
    assert set(_nox_sessions()) == covered


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="what a CPU-only machine sees")
@pytest.mark.parametrize("name,posargs,expect", SESSION_CASES)
def test_nox_session_on_cpu(nox_checkout, name, posargs, expect):
    base, copy = nox_checkout
    posargs = [a.format(tmp=base, logs=base / "logs") for a in posargs]
    envdir = base / "envs"
    reuse = ["--reuse-venv", "yes"]
    if name == "tests" and os.environ.get("NOX_CURRENT_SESSION") == "tests" and os.environ.get("VIRTUAL_ENV"):
        # Inside `nox -s tests` its own virtualenv already holds everything: run in it rather than install again.
        envdir = Path(os.environ["VIRTUAL_ENV"]).parent
        reuse = ["--reuse-venv", "yes", "--no-install"]
    cmd = [sys.executable, "-m", "nox", "--non-interactive", "-f", copy / "noxfile.py", "--envdir", envdir, *reuse,
           "-s", name]
    start = time.monotonic()
    result = _run([*cmd, "--", *posargs] if posargs else cmd, cwd=copy, env=_clean_env())
    took = time.monotonic() - start
    output = result.stdout + result.stderr
    if expect == GPU_ONLY:
        assert result.returncode != 0, output[-3000:]
        errors = [line for line in output.splitlines() if "aborted" in line or "failed" in line]
        assert len(errors) == 1 and GPU_ONLY in errors[0], output[-3000:]
        assert "pip install" not in output, "a GPU-only session installed something before stopping"
        assert took < 120, f"took {took:.0f} s to stop"
        return
    if name == "lock" and "interpreter 3.12 not found" in output:
        pytest.skip("no Python 3.12 on this machine (.ci/run skips `nox -s lock` then too)")
    assert result.returncode == 0, output[-5000:]
    if posargs[-2:] == ["--logs", str(base / "logs")] and "--device" in posargs:
        rows = [json.loads(line) for line in (base / "logs" / "cpu" / "smoke.jsonl").read_text().splitlines()]
        assert rows and all(r["status"] == "ok" for r in rows), [(r["provider"], r["error"]) for r in rows]
    if name == "figures":
        assert list((base / "figures").rglob("*.png")), "figures drew nothing"
