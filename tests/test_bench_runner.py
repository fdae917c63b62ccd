"""The benchmark runner on CPU: row schema, resume, kill -9 and rerun, torn lines, failing providers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from flash_tt_attn.bench import measure, providers  # noqa: E402
from flash_tt_attn.bench.__main__ import main as bench_main  # noqa: E402
from flash_tt_attn.bench.logs import newest, read_rows  # noqa: E402
from flash_tt_attn.bench.runner import run_specs  # noqa: E402
from flash_tt_attn.bench.spec import load_spec, row_key  # noqa: E402

REQUIRED = ("spec", "provider", "B", "H", "L", "D", "dtype", "mode", "status", "ms", "ms_p20", "ms_p80",
            "peak_mem_mb", "gpu", "driver", "cuda", "torch", "triton", "git_sha", "dirty", "timestamp")
REPO = Path(__file__).resolve().parents[1]


def make_spec(tmp_path, spec_id="tiny", providers=("naive",), L=(4, 8), modes=("fwd",), rep_ms=2,
              metrics=("latency", "memory"), **block):
    specs = tmp_path / "specs"
    specs.mkdir(exist_ok=True)
    sweep = {"B": [1], "H": [2], "D": [16], "L": list(L), "dtype": ["float32"], "mode": list(modes)}
    data = {
        "id": spec_id, "description": "tiny CPU spec", "providers": list(providers),
        "metrics": list(metrics), "timing": {"warmup_ms": 1, "rep_ms": rep_ms},
        "sweeps": [{**sweep, **block}],
    }
    if block:
        data["op"] = "triangle_block"
    (specs / f"{spec_id}.yaml").write_text(yaml.safe_dump(data))
    return specs, tmp_path / "logs"


def run(specs, logs, *names, **kw):
    return run_specs(list(names), specs, logs, device="cpu", **kw)


def log_of(logs, spec_id="tiny"):
    return logs / "cpu" / f"{spec_id}.jsonl"


def assert_each_point_once(specs, logs, spec_id="tiny"):
    expected = sorted(p.key() for p in load_spec(specs / f"{spec_id}.yaml").points())
    got = sorted(row_key(r) for r in read_rows(log_of(logs, spec_id)))
    assert got == expected


def test_rows_follow_the_schema_and_rerun_resumes(tmp_path):
    specs, logs = make_spec(tmp_path, modes=("fwd", "fwd_bwd"))
    assert run(specs, logs, "tiny") == 4
    rows = read_rows(log_of(logs))
    assert len(rows) == 4
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert r["status"] == "ok" and "error" not in r
        assert r["dtype"] == "float32" and r["mode"] in ("fwd", "fwd_bwd") and r["gpu"] == "cpu"
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["peak_mem_mb"] is None  # no memory numbers off CUDA
    assert run(specs, logs, "tiny") == 0  # everything done
    assert run(specs, logs, "tiny", force=True) == 4
    assert len(read_rows(log_of(logs))) == 8 and len(newest(read_rows(log_of(logs)))) == 4


def test_rows_of_another_commit_do_not_settle_a_point(tmp_path, monkeypatch):
    """A rerun at a new commit measures every point again (appending); back at the old commit, its rows count."""
    specs, logs = make_spec(tmp_path, modes=("fwd",))
    monkeypatch.setenv("FLASH_TT_ATTN_GIT_SHA", "1111111")
    monkeypatch.setenv("FLASH_TT_ATTN_GIT_DIRTY", "0")
    assert run(specs, logs, "tiny") == 2
    monkeypatch.setenv("FLASH_TT_ATTN_GIT_SHA", "2222222")
    assert run(specs, logs, "tiny") == 2
    assert run(specs, logs, "tiny") == 0
    monkeypatch.setenv("FLASH_TT_ATTN_GIT_SHA", "1111111")
    assert run(specs, logs, "tiny") == 0
    assert [r["git_sha"] for r in read_rows(log_of(logs))] == ["1111111"] * 2 + ["2222222"] * 2


HOST_GRAPH = ("host_ms", "host_ms_p20", "host_ms_p80", "host_wall_ms", "host_calls", "graph_ms", "graph_ms_p20",
              "graph_ms_p80", "graph_error")


def test_host_and_graph_metrics_fill_their_fields_and_a_new_metric_measures_again(tmp_path):
    specs, logs = make_spec(tmp_path, modes=("fwd", "fwd_bwd"), L=(4,))
    assert run(specs, logs, "tiny") == 2
    assert not set(HOST_GRAPH) & set(read_rows(log_of(logs))[0])  # a spec without them: no such fields
    make_spec(tmp_path, modes=("fwd", "fwd_bwd"), L=(4,), metrics=("latency", "memory", "host", "graph"))
    assert run(specs, logs, "tiny") == 2  # the old rows lack the host and graph fields
    rows = newest(read_rows(log_of(logs)))
    assert len(rows) == 2
    for r in rows:
        assert set(HOST_GRAPH) <= set(r) and r["status"] == "ok"
        assert 0 < r["host_ms_p20"] <= r["host_ms"] <= r["host_ms_p80"] and r["host_wall_ms"] > 0
        assert measure.HOST_MIN_CALLS <= r["host_calls"] <= measure.HOST_CALLS
        assert all(r[k] is None for k in ("graph_ms", "graph_ms_p20", "graph_ms_p80", "graph_error"))  # CPU
    assert run(specs, logs, "tiny") == 0


def test_host_time_times_each_call_between_two_syncs(monkeypatch):
    """host_ms is the time spent in the call (a call that sleeps 3 ms takes at least that), the leaves'
    gradients are None when each call starts (reset outside the timed region), and the device is
    synchronised exactly twice: before and after the loop, never between calls."""
    import torch

    leaf = torch.zeros(3, requires_grad=True)
    starts, syncs = [], []

    def call():
        starts.append(leaf.grad is None)
        time.sleep(0.003)
        leaf.grad = torch.ones(3)

    monkeypatch.setattr(measure, "_sync", lambda device: syncs.append(len(starts)))
    out = measure.host_time(call, [leaf], torch.device("cpu"), rep_ms=1.0)
    assert out["host_calls"] == measure.HOST_MIN_CALLS  # rep_ms passed: stops at the minimum
    assert len(starts) == measure.HOST_WARMUP_CALLS + out["host_calls"] and all(starts)
    assert syncs == [measure.HOST_WARMUP_CALLS, len(starts)]
    assert 3.0 <= out["host_ms_p20"] <= out["host_ms"] <= out["host_ms_p80"] < 50
    assert out["host_wall_ms"] >= out["host_ms_p20"]
    assert leaf.grad is None
    # a longer budget times more calls, up to HOST_CALLS
    assert measure.host_time(lambda: None, [], torch.device("cpu"), rep_ms=1e6)["host_calls"] == measure.HOST_CALLS


def test_graph_replay_check_rejects_a_replay_that_does_not_do_the_work():
    """The check fills the captured outputs with NaN and replays once: a replay that writes nothing, or
    something else than the eager call, is caught; on CPU no graph is tried at all."""
    import torch

    ref = torch.randn(4, 5)
    out = torch.empty(4, 5)
    assert "not (fully) written" in measure.check_replay(lambda: None, [out], [ref])
    assert "differs" in measure.check_replay(lambda: out.copy_(2 * ref), [out], [ref])
    assert measure.check_replay(lambda: out.copy_(ref), [out], [ref]) is None
    assert torch.equal(out, ref)
    assert "no output" in measure.check_replay(lambda: None, [], [])
    nothing = measure.graph_time(lambda: ref, [], torch.device("cpu"), 1, 1)
    assert nothing == dict.fromkeys(("graph_ms", "graph_ms_p20", "graph_ms_p80", "graph_error"))


def test_block_ending_node_builds_the_ending_block(tmp_path, monkeypatch):
    built = []
    build = providers.BlockProvider.build

    def spy(self, c_in, c_hidden, heads, starting=True):
        module = build(self, c_in, c_hidden, heads, starting=starting)
        built.append((self.name, starting, module.starting))
        return module

    monkeypatch.setattr(providers.BlockProvider, "build", spy)
    specs, logs = make_spec(tmp_path, providers=("naive",), L=(4,), modes=("fwd_bwd",), c_in=[8],
                            node=["starting", "ending"], metrics=("latency", "host", "graph"))
    assert run(specs, logs, "tiny") == 2
    rows = {r["node"]: r for r in read_rows(log_of(logs))}
    assert set(rows) == {"starting", "ending"} and all(r["status"] == "ok" and r["c_in"] == 8 for r in rows.values())
    assert sorted(built) == [("naive", False, False), ("naive", True, True)]
    assert all(r["host_ms"] > 0 for r in rows.values())


def test_dry_run_of_the_shipped_training_and_block_specs(tmp_path, capsys):
    run_specs(["training", "block"], REPO / "experiments", tmp_path / "logs", device="cpu", dry_run=True)
    out = capsys.readouterr().out
    assert "# training -> " in out and "# block -> " in out
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert sum(line.startswith("training\t") for line in lines) == 65
    assert sum(line.startswith("block\t") for line in lines) == 40 + 3 * 8 + 4  # and the variants' points
    assert sum("-ending-" in line for line in lines) == 20 and all(line.endswith("\ttodo") for line in lines)
    assert not (tmp_path / "logs").exists()


def test_dry_run_lists_points_and_measures_nothing(tmp_path, capsys):
    specs, logs = make_spec(tmp_path)
    run(specs, logs, "tiny", dry_run=True)
    out = capsys.readouterr().out
    assert out.count("\ttodo") == 2 and not log_of(logs).exists()
    run(specs, logs, "tiny")
    run(specs, logs, "tiny", dry_run=True)
    assert capsys.readouterr().out.count("\tdone") == 2


def test_only_measures_the_matching_points_and_a_later_run_the_rest(tmp_path, capsys):
    specs, logs = make_spec(tmp_path, L=(4, 8, 12), modes=("fwd", "fwd_bwd"))
    run(specs, logs, "tiny", dry_run=True, only=["L=4,12", "mode=fwd"])
    listed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(listed) == 2 and all("-fwd" in line and "-fwd_bwd" not in line for line in listed)
    assert run(specs, logs, "tiny", only=["L=4,12", "mode=fwd"]) == 2
    assert sorted((r["L"], r["mode"]) for r in read_rows(log_of(logs))) == [(4, "fwd"), (12, "fwd")]
    assert run(specs, logs, "tiny", only=["L=4"]) == 1  # L=4 fwd_bwd: the one matching point not yet done
    assert run(specs, logs, "tiny") == 3  # the rest, each point once
    assert_each_point_once(specs, logs)


@pytest.mark.parametrize("only, match", [
    (["L"], "expected FIELD=VALUE"), (["L="], "expected FIELD=VALUE"),
    (["size=4"], "FIELD one of op, provider, B, H, L"),
    (["L=5", "mode=fwd"], "--only L=5 mode=fwd: no point of spec 'tiny' matches"),
])
def test_only_rejects_unknown_fields_and_filters_that_match_nothing(tmp_path, only, match):
    specs, logs = make_spec(tmp_path)
    with pytest.raises(ValueError, match=match):
        run(specs, logs, "tiny", only=only)
    assert not log_of(logs).exists()


def test_cli_only_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    specs, logs = make_spec(tmp_path)
    assert bench_main(["run", "tiny", "--specs", str(specs), "--logs", str(logs), "--device", "cpu",
                       "--only", "size=4"]) == 2
    assert capsys.readouterr().err.startswith("error: --only 'size=4'")


def test_failing_provider_is_an_error_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    specs, logs = make_spec(tmp_path, providers=("naive", "flex"), L=(4, 8, 12))
    bind = providers.Naive.bind

    def flaky(self, q, k, v, bias):
        if q.shape[2] == 8:
            raise RuntimeError("boom at L=8")
        return bind(self, q, k, v, bias)

    monkeypatch.setattr(providers.Naive, "bind", flaky)
    run(specs, logs, "tiny")
    rows = {(r["provider"], r["L"]): r for r in read_rows(log_of(logs))}
    assert len(rows) == 6
    assert rows[("naive", 8)]["status"] == "error" and "boom at L=8" in rows[("naive", 8)]["error"]
    assert rows[("naive", 4)]["status"] == rows[("naive", 12)]["status"] == "ok"
    assert rows[("flex", 4)]["status"] == "unsupported" and "CUDA" in rows[("flex", 4)]["error"]
    # A rerun retries only the error point (unsupported counts as done); the newest row wins.
    monkeypatch.setattr(providers.Naive, "bind", bind)
    assert run(specs, logs, "tiny") == 1
    latest = {(r["provider"], r["L"]): r for r in newest(read_rows(log_of(logs)))}
    assert latest[("naive", 8)]["status"] == "ok"


def test_torn_last_line_is_reported_skipped_and_repaired(tmp_path, capsys):
    specs, logs = make_spec(tmp_path, L=(4, 8, 12))
    run(specs, logs, "tiny")
    path = log_of(logs)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-write
    capsys.readouterr()
    assert len(read_rows(path)) == 2
    assert "torn last line" in capsys.readouterr().err
    assert run(specs, logs, "tiny") == 1  # the torn point is measured again
    assert "removed a torn last line" in capsys.readouterr().err
    assert path.read_text().endswith("\n")
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert_each_point_once(specs, logs)


def test_invalid_line_in_the_middle_is_reported_and_skipped(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{not json}\n[1, 2]\n{"a": 2}\n')
    assert read_rows(path) == [{"a": 1}, {"a": 2}]
    err = capsys.readouterr().err
    assert "x.jsonl:2: not valid JSON" in err and "x.jsonl:3: not a JSON object" in err


def test_newest_row_wins_by_timestamp():
    base = {"spec": "s", "provider": "p", "B": 1, "H": 1, "L": 4, "D": 16, "dtype": "float32", "mode": "fwd"}
    rows = [{**base, "ms": 2.0, "timestamp": "2026-01-02T00:00:00.000000+00:00"},
            {**base, "ms": 1.0, "timestamp": "2026-01-01T00:00:00.000000+00:00"},
            {**base, "L": 8, "ms": 3.0, "timestamp": "2026-01-01T00:00:00.000000+00:00"}]
    assert sorted(r["ms"] for r in newest(rows)) == [2.0, 3.0]


def test_killed_run_resumes_with_every_point_exactly_once(tmp_path):
    # flash_tt_attn runs its PyTorch path (no interpreter) so each point is quick but still ~rep_ms long.
    specs, logs = make_spec(tmp_path, providers=("flash_tt_attn", "naive"), L=(4, 5, 6, 7), rep_ms=120)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "flash_tt_attn.bench", "run", "tiny", "--specs", str(specs), "--logs", str(logs),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = log_of(logs)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = path.read_text().count("\n")
    assert 2 <= n_before < 8, "the run finished before it could be killed"
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_each_point_once(specs, logs)
    assert path.read_text().count("\n") == 8


def test_import_flash_tt_attn_stays_light():
    # (tqdm is left out: `import torch` itself imports it when installed, through torch.hub.)
    code = ("import sys, flash_tt_attn, flash_tt_attn.bench, flash_tt_attn.bench.spec; "
            "heavy = {'pandas', 'seaborn', 'matplotlib', 'yaml'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_stated_commit_wins_over_the_copy_s_own_git(monkeypatch):
    """A tree copied to a remote GPU may carry a stale .git: the commit its sender states is recorded."""
    from flash_tt_attn.bench import env

    monkeypatch.setenv("FLASH_TT_ATTN_GIT_SHA", "0123abc")
    monkeypatch.setenv("FLASH_TT_ATTN_GIT_DIRTY", "0")
    assert env._git_state() == ("0123abc", False)
    monkeypatch.delenv("FLASH_TT_ATTN_GIT_SHA")
    sha, _ = env._git_state()
    assert sha != "0123abc" and (sha is None or len(sha) == 40)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bias_free_ceilings_are_plain_attention_over_the_folded_rows(monkeypatch):
    """flex_plain and sdpa_cudnn_plain fold rows into the batch and ignore the bias: their output is the
    reference attention with a zero bias. Checked on the CPU with each provider's kernel choice stubbed out
    (eager flex, SDPA's default backend); on a CPU device their load() says unsupported."""
    import contextlib

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from flash_tt_attn.reference import attention_reference

    torch.manual_seed(0)
    B, H, L, D = 2, 3, 8, 16
    q, k, v = (torch.randn(B, H, L, L, D, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(B, H, L, L, dtype=torch.float64)
    expected = attention_reference(q, k, v, torch.zeros_like(bias))
    monkeypatch.setattr(providers, "_COMPILED_FLEX", flex_attention)
    for cls in (providers.FlexPlain, providers.SdpaCudnnPlain):
        provider = cls()
        with pytest.raises(providers.Unsupported, match="CUDA"):
            provider.load(torch.device("cpu"))
        provider._context = contextlib.nullcontext
        native = [providers.to_layout(t, provider.layout).contiguous() for t in (q, k, v)]
        out = providers.from_layout(provider.bind(*native, bias)(), provider.layout)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=cls.name)


def test_lengths_providers_call_attention_with_their_lengths():
    """flash_tt_attn_lengths is the call with odd items of L/2 residues (the masked call, padded pairs 0);
    flash_tt_attn_lengths_full, with every item of L residues, is the unpadded function: both against fp64."""
    import torch

    from flash_tt_attn.api import lengths_mask
    from flash_tt_attn.reference import attention_reference

    torch.manual_seed(0)
    B, H, L, D = 2, 1, 6, 16
    q, k, v = (torch.randn(B, H, L, L, D) for _ in range(3))
    bias = torch.randn(B, H, L, L)
    real = lengths_mask(torch.tensor([L, L // 2]), L)
    f64 = [t.double() for t in (q, k, v, bias)]
    padded = attention_reference(*f64, mask=real) * real[:, None, :, :, None]
    for name, want in (("flash_tt_attn_lengths", padded), ("flash_tt_attn_lengths_full", attention_reference(*f64))):
        provider = providers.get_provider("attention", name)
        provider.load(torch.device("cpu"))
        got = provider.bind(q, k, v, bias)()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)
    assert bool((padded[1, :, L // 2:] == 0).all()) and not bool((padded[0] == 0).any())


@pytest.mark.gpu
def test_bias_free_ceilings_on_the_gpu():
    """On CUDA, compiled flex with no score_mod and SDPA on cuDNN's kernel compute plain attention (the
    reference with a zero bias) over the folded rows, in fp16."""
    import torch

    from flash_tt_attn.reference import attention_reference

    torch.manual_seed(0)
    B, H, L, D = 2, 2, 64, 32
    q, k, v = (torch.randn(B, H, L, L, D, device="cuda", dtype=torch.float16) for _ in range(3))
    bias = torch.randn(B, H, L, L, device="cuda", dtype=torch.float16)
    expected = attention_reference(q.double(), k.double(), v.double(), torch.zeros_like(bias, dtype=torch.float64))
    for cls in (providers.FlexPlain, providers.SdpaCudnnPlain):
        provider = cls()
        provider.load(torch.device("cuda"))
        native = [providers.to_layout(t, provider.layout).contiguous() for t in (q, k, v)]
        with torch.no_grad():
            out = providers.from_layout(provider.bind(*native, bias)(), provider.layout).double()
        rel = ((out - expected).norm() / expected.norm()).item()
        assert rel < 2e-3, (cls.name, rel)


def test_checks_log_resumes_a_passed_suite_only_at_its_commit_with_a_clean_tree(tmp_path):
    """make reproduce's record of passed suites (bench/checks.py): a suite counts as passed only for the commit
    and GPU it passed on, never for a dirty tree; the figures ignore the file."""
    from flash_tt_attn.bench import checks

    env = {"gpu": "NVIDIA H200", "driver": None, "cuda": None, "torch": "x", "triton": "y", "git_sha": "abc1234",
           "dirty": False}
    assert not checks.passed("gpu_tests", tmp_path, env)
    path = checks.record("gpu_tests", tmp_path, env)
    assert path == tmp_path / "nvidia-h200" / "checks.jsonl"
    assert checks.passed("gpu_tests", tmp_path, env)
    assert not checks.passed("gradcheck", tmp_path, env)
    assert not checks.passed("gpu_tests", tmp_path, {**env, "git_sha": "def5678"})
    assert not checks.passed("gpu_tests", tmp_path, {**env, "gpu": "NVIDIA H100 80GB HBM3"})
    assert not checks.passed("gpu_tests", tmp_path, {**env, "dirty": True})
    [row] = read_rows(path)
    assert row["check"] == "gpu_tests" and row["git_sha"] == "abc1234" and row["timestamp"]


def test_slow_calls_are_timed_three_times_between_events_not_by_do_bench(monkeypatch):
    """time_call on CUDA: a call slower than SLOW_CALL_MS gets SLOW_CALL_REPEATS event-timed calls (do_bench
    would run eight and time one); a faster one goes to do_bench after its one event-timed call. CUDA's events
    and synchronisation are stood in for by the host clock here."""
    import torch
    import triton.testing

    class FakeEvent:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    benched = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: benched.append(fn) or [1.0, 0.5, 2.0])
    monkeypatch.setattr(measure, "SLOW_CALL_MS", 20.0)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    med, p20, p80 = measure.time_call(slow, [], torch.device("cuda"), 25, 100)
    assert len(calls) == measure.SLOW_CALL_REPEATS and not benched
    assert 25 <= p20 <= med <= p80
    calls.clear()
    assert measure.time_call(lambda: calls.append(1), [], torch.device("cuda"), 25, 100) == (1.0, 0.5, 2.0)
    assert len(calls) == 1 and len(benched) == 1
