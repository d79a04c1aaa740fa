"""`python -m hvae_fast.gpucheck`: the no-CUDA refusal, the stage runner (timeouts, failures, a report
after every stage) with fake stage commands, the goal verdicts on hand-made results, and (slow) the
whole --allow-cpu rehearsal."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hvae_fast import cli, gpucheck
from hvae_fast.gpucheck import Stage, run_stages

PY = sys.executable
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@NO_CUDA
def test_refuses_without_cuda_in_one_line(tmp_path):
    p = subprocess.run([PY, "-m", "hvae_fast.gpucheck", "--out", str(tmp_path / "gc")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvae-fast: error: no CUDA GPU here") and "--allow-cpu" in lines[0]
    assert not (tmp_path / "gc").exists()


@NO_CUDA
def test_cli_subcommand_refuses_the_same_way(tmp_path, capsys):
    assert cli.main(["gpucheck", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hvae-fast: error: no CUDA GPU here")


@NO_CUDA
def test_shell_wrapper(tmp_path):
    sh = gpucheck.REPO / "bench" / "gpu_check.sh"
    p = subprocess.run(["sh", str(sh)], capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=PY))
    assert p.returncode != 0 and "usage: bench/gpu_check.sh DIR" in p.stderr
    p = subprocess.run(["sh", str(sh), "rel/gc", "--budget", "60"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, PYTHON=PY))
    assert p.returncode == 2 and p.stderr.startswith("hvae-fast: error: no CUDA GPU here") and p.stderr.count("\n") == 1


def _py(code):
    return [PY, "-c", code]


def test_stages_run_in_order_with_timeout_failure_and_a_report_after_each(tmp_path):
    out = tmp_path
    # The second stage reads the report written after the first: a partial report exists mid-run.
    check = ("import json, sys; r = json.load(open(sys.argv[1])); "
             "sys.exit(0 if [s['status'] for s in r['stages']] == ['ok', 'pending', 'pending', 'pending', 'pending'] "
             "and r['stages'][0]['tail'] == ['one'] else 1)")
    # The slow stage leaves a grandchild; the timeout must end the whole process group.
    slow = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(out / 'child.pid')!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    sts = [Stage("first", _py("print('one')"), 30),
           Stage("partial", _py(check) + [str(out / "report.json")], 30),
           Stage("fails", _py("import sys; print('line'); print('boom', file=sys.stderr); sys.exit(3)"), 30),
           Stage("slow", _py(slow), 2),
           Stage("after", _py("print('still runs')"), 30)]
    rep = run_stages(sts, out, {"mode": "cuda", "started": "t0", "budget_s": 100}, budget_s=100)
    st = {s["name"]: s for s in rep["stages"]}
    assert [s["status"] for s in rep["stages"]] == ["ok", "ok", "failed", "timeout", "ok"]
    assert st["fails"]["rc"] == 3 and st["fails"]["tail"] == ["line", "boom"]
    # its limit is its share of what is left: about 100 * 2 / 32 s
    assert st["slow"]["tail"] == ["started"] and st["slow"]["seconds"] < 15 and "6 s limit" in st["slow"]["note"]
    child = int((out / "child.pid").read_text())
    try:
        state = open(f"/proc/{child}/status").read().split("State:")[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        state = "gone"
    assert state in ("gone", "Z")
    assert (out / "fails.log").read_text().splitlines() == ["line", "boom"]
    on_disk = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in on_disk["stages"]] == ["ok", "ok", "failed", "timeout", "ok"]
    md = (out / "report.md").read_text()
    for s in sts:
        assert f"| {s.name} | {s.status}" in md
    assert "### fails: failed, last lines of fails.log" in md and "boom" in md
    # Nothing measured: every goal says so, with the file it looked for.
    assert [g["status"] for g in rep["goals"]] == ["not measured"] * 3
    assert "steps.json" in rep["goals"][0]["detail"] and "memory-recompute.json" in rep["goals"][2]["detail"]


def test_stage_is_skipped_when_the_budget_is_spent(tmp_path):
    sts = [Stage("late", _py("print('never')"), 30)]
    rep = run_stages(sts, tmp_path, {"mode": "cuda", "started": "t0", "budget_s": 5}, budget_s=5)
    assert rep["stages"][0]["status"] == "skipped" and "budget" in rep["stages"][0]["note"]
    assert not (tmp_path / "late.log").exists()


def test_stage_limits_are_shares_of_the_budget(tmp_path):
    # The plan: weights scaled to the budget, every stage at least MIN_STAGE_S, the sum the budget.
    for cpu in (False, True):
        sts = gpucheck.stages(tmp_path, cpu=cpu)
        assert sum(s.budget_s for s in sts) == gpucheck.BUDGET_S
        p = gpucheck.plan(sts, gpucheck.BUDGET_S)
        assert abs(sum(p.values()) - gpucheck.BUDGET_S) < 1e-6 and min(p.values()) >= gpucheck.MIN_STAGE_S
    p = gpucheck.plan(sts, 900)
    assert p["build"] == 160 and abs(sum(p.values()) - 900) < 1e-6
    with pytest.raises(gpucheck.HVAEError, match=r"--budget 100 gives the info stage 4.4 s.*--budget 225 or more"):
        gpucheck.plan(sts, 100)
    # Run: a stage gets its share of what is left, never the whole budget; time left over goes on.
    sts = [Stage("a", _py("print('a')"), 300), Stage("b", _py("print('b')"), 100)]
    rep = run_stages(sts, tmp_path, {"mode": "cuda", "started": "t0", "budget_s": 40}, budget_s=40)
    a, b = rep["stages"]
    assert a["status"] == b["status"] == "ok"
    assert abs(a["timeout_s"] - 30) < 0.5 and 38 - a["seconds"] < b["timeout_s"] <= 40 - a["seconds"]


def test_on_a_gpu_every_stage_requires_the_cpp_and_cuda_backends(tmp_path, monkeypatch):
    for st in gpucheck.stages(tmp_path, cpu=False):
        assert st.env.get("HVAE_REQUIRE_CUDA") == "1" and st.env.get("HVAE_REQUIRE_CPP") == "1", st.name
    assert not any("HVAE_REQUIRE_CUDA" in st.env for st in gpucheck.stages(tmp_path, cpu=True))
    # hvae-fast build fails without the CUDA extension under HVAE_REQUIRE_CUDA=1 (the build stage)
    from hvae_fast.ops import native

    monkeypatch.setattr(native, "build_all", lambda verbose=False: {"cpp": (True, "ok"),
                                                                    "cuda": (False, "no CUDA device available")})
    assert cli.main(["build"]) == 0
    monkeypatch.setenv("HVAE_REQUIRE_CUDA", "1")
    assert cli.main(["build"]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure where no CUDA backend can exist")
def test_kernel_tests_and_op_benchmarks_fail_without_the_cuda_backend_when_required(tmp_path):
    env = dict(os.environ, HVAE_REQUIRE_CUDA="1", PYTHONPATH=str(gpucheck.REPO))
    p = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backends.py", "-k",
                        "test_rho_one_is_identity and cuda"], cwd=gpucheck.REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "cuda backend unavailable with HVAE_REQUIRE_CUDA=1" in p.stdout, p.stdout[-2000:]
    p = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_ou_ops.py", "--co"],
                       cwd=gpucheck.REPO, env=dict(env, HVAE_BENCH_QUICK="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "HVAE_REQUIRE_CUDA=1" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]


def _bench(group, name, median, **extra):
    return {"group": group, "name": name, "stats": {"median": median}, "extra_info": extra}


def test_goal_verdicts_from_results(tmp_path):
    cg = "step-cifar10-resnet-4"
    steps = [_bench(cg, "vae", 0.100, batch=64), _bench(cg, "hvae-torch", 0.300, batch=64),
             _bench(cg, "hvae-triton", 0.125, batch=64), _bench(cg, "hvae-cuda", 0.140, batch=64)]
    ops = [_bench("op-gaussian_head-fwd-cifar10-feat100", "triton", 1e-3, large=True, bandwidth_frac=0.8),
           _bench("op-gaussian_head-fwd-cifar10-feat100", "cuda", 1e-3, large=True, bandwidth_frac=0.5),
           _bench("op-correlated_samples-bwd-cifar10-feat100", "cuda", 1e-3, large=True, bandwidth_frac=0.72),
           _bench("op-correlated_samples-bwd-mnist-mlp", "cuda", 1e-3, large=False, bandwidth_frac=0.1),
           _bench("op-correlated_samples-bwd-cifar10-feat100", "torch", 1e-3, large=True, bandwidth_frac=0.1)]
    (tmp_path / "steps.json").write_text(json.dumps({"benchmarks": steps}))
    (tmp_path / "ops.json").write_text(json.dumps({"benchmarks": ops}))
    row = dict(layers=4, memory_kind="cuda max_memory_allocated", cpu_peak_bytes=None)
    (tmp_path / "memory-recompute.json").write_text(json.dumps(
        {"rows": [dict(row, model="vae", memory_bytes=1000), dict(row, model="hvae", memory_bytes=1300)]}))
    g = gpucheck.goals(tmp_path, cpu=False)
    assert [x["status"] for x in g] == ["met", "met", "not met"]  # 1.25x; min best 72%; 1.30x
    assert "hvae-triton 1.25x" in g[0]["detail"] and "72% (cuda)" in g[1]["detail"] and "1.30x" in g[2]["detail"]
    # each figure names the backend that achieved it, not the last one read (cuda, 50%, came after triton)
    assert "gaussian_head-fwd-cifar10-feat100: 80% (triton)" in g[1]["detail"]
    steps[2]["stats"]["median"] = 0.135  # best fused 1.35x
    ops[2]["extra_info"]["bandwidth_frac"] = 0.69
    (tmp_path / "steps.json").write_text(json.dumps({"benchmarks": steps}))
    (tmp_path / "ops.json").write_text(json.dumps({"benchmarks": ops}))
    assert [x["status"] for x in gpucheck.goals(tmp_path, cpu=False)][:2] == ["not met", "not met"]
    for s in steps:
        s["extra_info"]["batch"] = 8
    (tmp_path / "steps.json").write_text(json.dumps({"benchmarks": steps}))
    assert gpucheck.goals(tmp_path, cpu=False)[0]["status"] == "not measured"
    assert [x["status"] for x in gpucheck.goals(tmp_path, cpu=True)] == ["not measured"] * 3


@pytest.mark.slow
def test_allow_cpu_rehearsal_writes_both_reports(tmp_path):
    # About 2 minutes on 2 cores: every stage in quick CPU mode.
    out = tmp_path / "gc"
    p = subprocess.run([PY, "-m", "hvae_fast", "gpucheck", "--out", str(out), "--allow-cpu"], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((out / "report.json").read_text())
    names = [s.name for s in gpucheck.stages(out, cpu=True)]
    assert rep["mode"] == "cpu-quick" and [s["name"] for s in rep["stages"]] == names
    assert all(s["status"] == "ok" for s in rep["stages"]), rep["stages"]
    md = (out / "report.md").read_text()
    assert all(f"| {n} | ok" in md for n in names)
    # Quick mode skips the torch.compile benchmarks, and pytest-benchmark >= 5.3 writes no JSON when
    # every benchmark of a run was skipped: ops-compiled.json exists only on a GPU run.
    for f in ("info.json", "tests.xml", "steps.json", "ops.json", "memory.json", "memory-recompute.json"):
        assert (out / f).is_file(), f
    assert rep["tests"]["tests"] > 0 and rep["tests"]["failures"] == rep["tests"]["errors"] == 0
    assert [g["status"] for g in rep["goals"]] == ["not measured"] * 3
    assert "## Benchmarks: steps.json" in md and "## Memory: memory-recompute.json" in md


def test_op_benchmark_times_kernels_with_cuda_events_over_back_to_back_calls(monkeypatch):
    # The GPU bandwidth figures divide by the CUDA-event time of many queued calls, not by a Python
    # call's wall time: a fake Event that reads how many calls were issued checks the bookkeeping.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ou_ops", gpucheck.REPO / "bench" / "bench_ou_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    issued = {"n": 0}

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = issued["n"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):  # milliseconds: 2 ms per call issued in between
            return 2.0 * (end.at - self.at)

    def no_sync(*a, **k):
        raise AssertionError("a sync between the timed calls")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    x = torch.ones(3, requires_grad=True)

    class Twice(torch.autograd.Function):  # counts forward and backward launches
        @staticmethod
        def forward(ctx, a):
            issued["n"] += 1
            return a * 2

        @staticmethod
        def backward(ctx, g):
            issued["n"] += 1
            return g * 2

    for mode, per_call in (("fwd", 1), ("bwd", 1), ("fwdbwd", 2)):
        issued["n"] = 0
        t = mod.cuda_event_time(Twice.apply, (x,), torch.ones(3), mode, calls=10, repeats=3)
        assert t == 0.002 * per_call  # seconds per call: 2 ms per launch, calls issued back to back
        assert issued["n"] == per_call * 31 + (mode == "bwd")  # one warm-up (+ the bwd's one forward)
