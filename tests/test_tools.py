"""Smoke runs of the maintained scripts in experiments/tools/ on CPU (issue 23: every script that stays is run by a
CPU test). Each one's --help, and a small real run where the script has a CPU mode: offline_compile compiles one
kernel for sm_90 without a GPU, distributed_scaling measures a tiny spec with gloo at world size 1, compile_bitwise
compares compiled and eager calls on the CPU path, readme_results checks the README's results table."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flash_tt_attn import tuning

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "experiments" / "tools"
SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py"))


def _run(script: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=environ, timeout=timeout, check=False)


def test_the_tools_are_the_maintained_four():
    assert SCRIPTS == ["compile_bitwise.py", "distributed_scaling.py", "offline_compile.py", "readme_results.py"]
    assert not (ROOT / "experiments" / "scripts").exists() and not (ROOT / "experiments" / "tuning").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = _run(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout


def test_offline_compile_one_kernel():
    """Triton compiles the bias-gradient kernel for sm_90 on this CPU-only machine (its NVIDIA backend ships ptxas)."""
    result = _run("offline_compile.py", "--kernel", "dbias")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("dbias: compiled ("), result.stdout


def test_offline_compile_the_padded_tail_forward_and_dq_load_whole_vectors():
    """The padded-tail variants (lengths=: per-item extents) of the forward and dq compile for sm_90, and read their
    16-bit tiles in vectors: at 50ea279 their bias tiles, masked at the loaded real length, were read two bytes at a
    time and a padded batch ran slower than the unpadded one (PERF.md, v24)."""
    result = _run("offline_compile.py", "--padded-tail", "--kernel", "forward", "--kernel", "dq")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["forward", "dq"], result.stdout
    for line in lines:
        assert "compiled (" in line and ", 0 two-byte global loads," in line, line


def test_offline_compile_at_an_odd_length_the_backward_reads_whole_vectors_only_from_a_padded_bias():
    """At L = 1000 (not a multiple of the 64-wide tiles) dq and dk/dv read their bias tiles, masked at L, two bytes
    at a time (Triton proves a mask at k < L constant over a vector only for L a multiple of 16), as the forward
    did before v27; with KernelOptions.pad_bias_tiles_backward's zero-padded copy they read whole vectors, and
    the forward reads its padded copy by default."""
    masked = _run("offline_compile.py", "--length", "1000", "--kernel", "dq", "--kernel", "dkdv")
    padded = _run("offline_compile.py", "--length", "1000", "--padded-bias-backward", "--kernel", "forward",
                  "--kernel", "dq", "--kernel", "dkdv")
    for result in (masked, padded):
        assert result.returncode == 0, result.stdout + result.stderr
    narrow = {}
    for name, result in (("masked", masked), ("padded", padded)):
        for line in result.stdout.splitlines():
            narrow[name, line.split(":")[0]] = int(re.search(r", (\d+) two-byte global loads,", line).group(1))
    assert narrow["masked", "dq"] > 0 and narrow["masked", "dkdv"] > 0, masked.stdout
    assert narrow["padded", "forward"] == narrow["padded", "dq"] == narrow["padded", "dkdv"] == 0, padded.stdout


def test_offline_compile_the_folded_launches_cost_dq_and_dkdv_no_occupancy():
    """KernelOptions.fold_split_sum and fold_bias_copy (v29) put a split sum into dk/dv and a bias copy into dq, each
    a loop before the kernel's own work: compiled for sm_90 they spill no more and hold as many programs per SM as
    the kernels without them (Triton 3.6: dq 126 registers, dk/dv 168 at its cap, no spill, either way)."""
    usage = {}
    for folded, flags in ((False, ()), (True, ("--fold-split-sum", "--fold-bias-copy"))):
        result = _run("offline_compile.py", *flags, "--kernel", "dq", "--kernel", "dkdv")
        assert result.returncode == 0, result.stdout + result.stderr
        for line in result.stdout.splitlines():
            found = re.search(r", (\d+) bytes spilled, (\d+) programs per SM", line)
            assert found, line
            usage[folded, line.split(":")[0]] = tuple(map(int, found.groups()))
    assert set(usage) == {(folded, kernel) for folded in (False, True) for kernel in ("dq", "dkdv")}
    for kernel in ("dq", "dkdv"):
        (spilled, programs), (spilled_folded, programs_folded) = usage[False, kernel], usage[True, kernel]
        assert spilled_folded <= spilled and programs_folded == programs, (kernel, usage)


def test_offline_compile_reports_registers_and_the_padded_forward_keeps_three_programs_per_sm(monkeypatch):
    """The forward's register cap (v25) keeps its padded-tail code at three programs per SM: uncapped it takes
    186 registers (Triton 3.6), two programs. The script compiles the shipped caps (tuning.TABLE's)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", ""))  # the import sets it to 0
    sys.path.insert(0, str(TOOLS))
    try:
        from offline_compile import MAX_REGISTERS, programs_per_sm  # noqa: PLC0415
    finally:
        sys.path.remove(str(TOOLS))
    for kernel, cap in MAX_REGISTERS.items():
        assert tuning.TABLE[kernel, "16-32", "16-bit"].config.max_registers == cap, kernel
    assert [programs_per_sm(r, 73728) for r in (168, 169, 186)] == [3, 2, 2]
    result = _run("offline_compile.py", "--padded-tail", "--kernel", "forward")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"forward: compiled \(.*, 1[0-6]\d registers, \d+ bytes spilled, 3 programs per SM\)$",
                     result.stdout.strip()), result.stdout


def test_offline_compile_counts_two_byte_loads(monkeypatch):
    """The count the test above relies on finds scalar 16-bit global loads and nothing else."""
    # Importing the script sets TRITON_INTERPRET=0 for itself; the tests after this one need the caller's value.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", ""))
    sys.path.insert(0, str(TOOLS))
    try:
        from offline_compile import two_byte_global_loads  # noqa: PLC0415
    finally:
        sys.path.remove(str(TOOLS))
    ptx = ("ld.global.b16 {%rs1}, [%rd1];\n@%p1 ld.global.L1::evict_last.b16 {%rs2}, [%rd2];\n"
           "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd3];\nld.global.b32 {%r5}, [%rd4];\n"
           "ld.shared.b16 {%rs3}, [%r6];\nld.global.u16 %rs4, [%rd5];\n")
    assert two_byte_global_loads(ptx) == 3


SPEC = """id: tiny-scaling
description: a CPU smoke test
provider: flash_tt_attn
world_sizes: [1]
timing: {warmup_ms: 1, rep_ms: 1}
sweeps:
  - {B: [1], H: [1], D: [16], L: [8], dtype: [float32], mode: [fwd, fwd_bwd], check: [false]}
"""


def test_distributed_scaling_dry_run_and_tiny_run(tmp_path):
    """World size 1 over gloo, as torchrun would start it: --dry-run lists two points to do and writes nothing; a
    real run appends one ok row per point; a rerun finds nothing left to measure."""
    pytest.importorskip("yaml")
    spec = tmp_path / "tiny-scaling.yaml"
    spec.write_text(SPEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    logs = tmp_path / "logs"
    dry = _run("distributed_scaling.py", spec, "--logs-dir", logs, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("\ttodo") == 2, dry.stdout
    assert not logs.exists()

    real = _run("distributed_scaling.py", spec, "--logs-dir", logs, env=env)
    assert real.returncode == 0, real.stderr
    rows = [json.loads(line) for path in logs.rglob("tiny-scaling.jsonl") for line in path.read_text().splitlines()]
    assert [(r["mode"], r["status"], r["world_size"]) for r in rows] == [("fwd", "ok", 1), ("fwd_bwd", "ok", 1)]

    again = _run("distributed_scaling.py", spec, "--logs-dir", logs, "--dry-run", env=env)
    assert again.returncode == 0 and again.stdout.count("\tdone") == 2, again.stdout + again.stderr


@pytest.mark.slow
def test_compile_bitwise_on_cpu():
    """torch.compile(attention) against eager on the CPU path (Inductor compiles for the CPU: slow). There the two
    calls differ in rounding (the reference against Inductor's fusion of it); the bitwise claim is the GPU's."""
    result = _run("compile_bitwise.py", "--device", "cpu", "--B", 1, "--H", 1, "--L", 9, "--D", 16, "--dtype",
                  "float32", env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("compile_vs_eager_bitwise ["), result.stdout


def test_readme_results_check():
    result = _run("readme_results.py", "--check", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout
