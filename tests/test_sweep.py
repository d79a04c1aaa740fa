"""`hvae-fast sweep`: grid expansion, names and columns, skipping and resuming points, failures,
the summary over seeds, and the critical-rho bisection."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvae_fast.experiments import sweep
from hvae_fast.cli import main
from hvae_fast.errors import HVAEError

REPO = Path(__file__).resolve().parent.parent
TINY = ["train", "binarized-mnist", "--preset", "mnist-mlp-40x4", "--steps", "4", "--batch-size", "16",
        "--eval-examples", "32", "--log-every", "2", "--eval-every", "4"]
FAST_EVAL = ["--eval-iw-samples", "5", "--eval-max-examples", "32"]


def fake_point(sweep_dir: Path, name: str, rho=0.9, method="hvae", steps=5000, ou=None, **ev):
    """A finished run directory: config.json (``ou`` adds OU fields) and eval-valid.json with the given figures."""
    d = sweep_dir / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"dataset": "binarized-mnist", "preset": "mnist-mlp-40x4", "method": method,
                                               "ou": {"rho": rho, "samples": 5, **(ou or {})}, "train": {"steps": steps}}))
    ev = {"elbo": -90.0, "iw_bound": -89.0, "top_kl": 1.0, "kl_total": 5.0, "kl_per_layer": [1.0, 2.0, 1.0, 1.0],
          "active_units": [4, 3, 2, 1], "step": steps, **ev}
    (d / "eval-valid.json").write_text(json.dumps(ev))
    return d


def make_sweep(root: Path, name: str, axes, base=TINY, critical=None) -> Path:
    spec = sweep.make_spec(base, [sweep.parse_axis(k, t) for k, t in axes], critical=critical)
    d = root / name
    sweep.prepare(d, spec)
    return d


# -- spec, expansion, names ------------------------------------------------------------------------

def test_grid_is_a_product_and_lists_are_zipped():
    axes = [sweep.parse_axis("grid", "rho=0.3,0.5,1.0"), sweep.parse_axis("grid", "seed=0,1,2")]
    pts = sweep.expand(axes)
    assert len(pts) == 9 and pts[0] == {"rho": "0.3", "seed": "0"} and pts[1] == {"rho": "0.3", "seed": "1"}
    assert {(p["rho"], p["seed"]) for p in pts} == {(r, s) for r in ("0.3", "0.5", "1.0") for s in "012"}
    axes = [sweep.parse_axis("list", "method=vae,hvae"), sweep.parse_axis("grid", "seed=0,1"),
            sweep.parse_axis("list", "rho=1.0,0.9")]
    pts = sweep.expand(axes)
    assert pts == [{"method": "vae", "rho": "1.0", "seed": "0"}, {"method": "vae", "rho": "1.0", "seed": "1"},
                   {"method": "hvae", "rho": "0.9", "seed": "0"}, {"method": "hvae", "rho": "0.9", "seed": "1"}]
    assert [sweep.point_name(p) for p in pts[:2]] == ["method=vae,rho=1.0,seed=0", "method=vae,rho=1.0,seed=1"]


def test_axis_parsing_flag_names_and_values_with_commas():
    a = sweep.parse_axis("grid", "--ou-samples=1,5")
    assert a == {"kind": "grid", "key": "ou_samples", "values": ["1", "5"]} and sweep.flag(a["key"]) == "--ou-samples"
    a = sweep.parse_axis("grid", "latent-sizes=40,40;40,40,40")
    assert a["values"] == ["40,40", "40,40,40"]
    assert sweep.point_name({"latent_sizes": "40,40", "seed": "0"}) == "latent_sizes=40-40,seed=0"
    for bad in ("rho", "rho=", "=1,2", "rho=0.5,0.5", "rho=0.5,,1"):
        with pytest.raises(HVAEError, match="rho=0.5"):
            sweep.parse_axis("grid", bad)


def test_list_axes_may_repeat_a_value_their_zipped_points_differ():
    # Fig. 3's grid: latent_sizes distinct, hidden_sizes repeats per depth
    axes = [sweep.parse_axis("list", "latent_sizes=10;40;10,10"), sweep.parse_axis("list", "hidden_sizes=200;200;200,200")]
    sweep.make_spec(TINY, axes)
    assert [sweep.point_name(p) for p in sweep.expand(axes)] == [
        "latent_sizes=10,hidden_sizes=200", "latent_sizes=40,hidden_sizes=200", "latent_sizes=10-10,hidden_sizes=200-200"]


def test_a_bad_axis_on_the_command_line_is_one_usage_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "s", "--root", str(tmp_path), "--grid", "rho=0.5,0.5", "--print-commands", "--", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "values must be non-empty and distinct" in err and "Traceback" not in err


@pytest.mark.parametrize("base, axes, critical, match", [
    (["eval", "x"], [], None, "starting with train"),
    (TINY + ["--out", "x"], [], None, "must not set --out"),
    (TINY + ["--seed", "3"], [("grid", "seed=0,1")], None, "--seed is both in the base command and swept"),
    (TINY, [("list", "method=vae,hvae"), ("list", "rho=1")], None, "same number of values"),
    (TINY, [("grid", "seed=0"), ("grid", "seed=1")], None, "swept twice"),
    (TINY, [("list", "latent_sizes=10;10;40"), ("list", "hidden_sizes=200;200;200")], None,
     "two --list alternatives are the same point: 10/200"),
    (TINY, [("grid", "rho=0.5")], {"threshold": 1, "rho_low": 0, "rho_high": 1, "iterations": 3}, "remove rho"),
    (TINY, [], {"threshold": 1, "rho_low": 0.8, "rho_high": 0.2, "iterations": 3}, "rho-low"),
])
def test_bad_specs_are_errors_that_name_the_fix(base, axes, critical, match):
    with pytest.raises(HVAEError, match=match):
        sweep.make_spec(base, [sweep.parse_axis(k, t) for k, t in axes], critical=critical)


def test_print_commands_lists_each_point_and_writes_nothing(tmp_path, capsys):
    rc = main(["sweep", "s", "--root", str(tmp_path), "--grid", "rho=0.5,1.0", "--grid", "seed=0,1",
               "--print-commands", "--", *TINY, "--data-dir", "/data"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 4 and not (tmp_path / "s").exists()
    train, ev = lines[1].split(" && ")
    assert train.endswith(f"--rho 0.5 --seed 1 --out {tmp_path}/s/rho=0.5,seed=1 --no-progress")
    assert " -m hvae_fast train binarized-mnist --preset mnist-mlp-40x4" in train
    assert f"-m hvae_fast eval {tmp_path}/s/rho=0.5,seed=1 --split valid --iw-samples 100" in ev
    assert ev.endswith("--data-dir /data")  # eval reads the data the run was trained on


def test_a_toml_spec_file_with_command_line_axes_and_overrides(tmp_path, capsys):
    spec = tmp_path / "phase.toml"
    spec.write_text('base = "train binarized-mnist --steps 5000"\neval_iw_samples = 50\n'
                    '[grid]\nrho = [0.5, 0.9]\n[list]\nmethod = ["vae", "hvae"]\nou_samples = [1, 5]\n')
    assert main(["sweep", "p", "--root", str(tmp_path), "--spec", str(spec), "--grid", "seed=0,1",
                 "--eval-iw-samples", "10", "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert "train binarized-mnist --steps 5000 --rho 0.9 --method hvae --ou-samples 5 --seed 1 --out" in lines[-1]
    assert "--iw-samples 10 " in lines[-1]  # the command line overrides the file
    json_spec = tmp_path / "s.json"
    json_spec.write_text(json.dumps({"base": ["train", "mnist"], "grid": {"seed": [0]}, "find_critical_rho": {}}))
    assert main(["sweep", "q", "--root", str(tmp_path), "--spec", str(json_spec)]) == 2
    assert "find_critical_rho needs a threshold" in capsys.readouterr().err
    json_spec.write_text(json.dumps({"base": "train mnist", "grids": {}}))
    assert main(["sweep", "q", "--root", str(tmp_path), "--spec", str(json_spec)]) == 2
    assert "unknown keys ['grids']" in capsys.readouterr().err


def test_a_different_spec_under_the_same_name_is_a_one_line_error(tmp_path, capsys):
    make_sweep(tmp_path, "s", [("grid", "seed=0,1")])
    rc = main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0,2", "--", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("hvae-fast: error:") and "differs in axes" in err and "another NAME or --root" in err


def test_more_seeds_grow_a_sweep_and_keep_its_finished_points(tmp_path, monkeypatch, capsys):
    d = make_sweep(tmp_path, "s", [("grid", "rho=0.5"), ("grid", "seed=0")])
    fake_point(d, "rho=0.5,seed=0", rho=0.5, elbo=-90.0)
    stamps = {f: f.stat().st_mtime_ns for f in (d / "rho=0.5,seed=0").iterdir()}
    FakeProcess.launched = []
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "rho=0.5", "--grid", "seed=0,1,2", "--", *TINY]) == 0
    out = capsys.readouterr().out
    assert "grows from 1 to 3 points" in out
    assert json.loads((d / "sweep.json").read_text())["axes"][1]["values"] == ["0", "1", "2"]
    assert sorted(out for stage, out, *_ in FakeProcess.launched if stage == "train") == \
        [str(d / "rho=0.5,seed=1"), str(d / "rho=0.5,seed=2")]
    assert {f: f.stat().st_mtime_ns for f in (d / "rho=0.5,seed=0").iterdir()} == stamps
    # dropping a finished point, or changing an axis's key, is not growth
    for axes in (["--grid", "rho=0.5", "--grid", "seed=1,2"], ["--grid", "rho=0.5", "--grid", "data_seed=0,1"],
                 ["--grid", "seed=0,1,2", "--grid", "rho=0.5"]):
        assert main(["sweep", "s", "--root", str(tmp_path), *axes, "--", *TINY]) == 2
        assert "differs in axes" in capsys.readouterr().err


def test_a_checkpointed_point_resumes_and_eval_follows_the_base_command(tmp_path):
    spec = sweep.make_spec(TINY + ["--device", "cpu"], [sweep.parse_axis("grid", "seed=0")], eval_iw_samples=7)
    p = sweep.Point(tmp_path, {"seed": "0"}, spec)
    p.dir.mkdir()
    (p.dir / "checkpoint-latest.pt").write_bytes(b"")
    (train, tcmd), (ev, ecmd) = p.stages(print)
    assert (train, ev) == ("train", "eval") and tcmd[-1] == "--resume" and p.dir.exists()
    assert ecmd[ecmd.index("--iw-samples") + 1] == "7" and ecmd[-2:] == ["--device", "cpu"]


# -- running points ----------------------------------------------------------------------------------

def test_finished_points_are_skipped_without_starting_a_process(tmp_path, monkeypatch, capsys):
    d = make_sweep(tmp_path, "s", [("grid", "rho=0.5,1.0"), ("grid", "seed=0,1")])
    for i, v in enumerate(sweep.expand(json.loads((d / "sweep.json").read_text())["axes"])):
        fake_point(d, sweep.point_name(v), rho=float(v["rho"]), elbo=-90.0 - i, top_kl=float(i))
    stamps = {f: f.stat().st_mtime_ns for f in d.glob("*/*")}

    def no_process(*a, **k):
        raise AssertionError("a finished point was started again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "rho=0.5,1.0", "--grid", "seed=0,1", "--", *TINY]) == 0
    assert "4/4 points already finished: skipped" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in d.glob("*/*")} == stamps
    rows = list(csv.DictReader(open(d / "results.csv")))
    assert [r["name"] for r in rows] == ["rho=0.5,seed=0", "rho=0.5,seed=1", "rho=1.0,seed=0", "rho=1.0,seed=1"]
    assert rows[3]["rho"] == "1.0" and rows[3]["seed"] == "1" and float(rows[3]["elbo"]) == -93.0
    assert float(rows[3]["top_kl"]) == 3.0 and rows[3]["kl_layer_2"] == "2.0" and rows[3]["active_units_layer_1"] == "4"
    assert rows[3]["active_units_total"] == "10" and rows[3]["status"] == "finished"
    js = json.loads((d / "results.json").read_text())
    assert js[0]["kl_per_layer"] == [1.0, 2.0, 1.0, 1.0] and js[0]["active_units"] == [4, 3, 2, 1]


class FakeProcess:
    """Stands in for a train/eval subprocess: exits 0 at once; train makes the run directory, eval
    writes eval-valid.json there."""

    launched = []

    def __init__(self, cmd, env, **kw):
        FakeProcess.launched.append((cmd[3], cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[4],
                                     "--resume" in cmd, env["OMP_NUM_THREADS"]))
        if cmd[3] == "train":
            Path(cmd[cmd.index("--out") + 1]).mkdir(exist_ok=True)
        else:
            (Path(cmd[4]) / "eval-valid.json").write_text(json.dumps({"elbo": -1.0, "top_kl": 0.0}))
        self.returncode = 0

    def poll(self):
        return 0


def test_workers_split_threads_and_each_point_trains_then_evaluates(tmp_path, monkeypatch):
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0,1,2")])
    pts = [sweep.Point(tmp_path, {"seed": s}, spec) for s in "012"]
    pts[1].dir.mkdir()
    (pts[1].dir / "checkpoint-latest.pt").write_bytes(b"")
    FakeProcess.launched = []
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    status = sweep.run_points(pts, workers=2, log=lambda m: None)
    assert status == {"seed=0": "finished", "seed=1": "finished", "seed=2": "finished"}
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    by_point = {}
    for stage, run, resume, t in FakeProcess.launched:
        by_point.setdefault(Path(run).name, []).append((stage, resume))
        assert t == threads
    assert by_point == {"seed=0": [("train", False), ("eval", False)], "seed=1": [("train", True), ("eval", False)],
                        "seed=2": [("train", False), ("eval", False)]}
    # a thread count the user set wins over the split
    FakeProcess.launched = []
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    for p in pts:
        (p.dir / sweep.EVAL_FILE).unlink()
    sweep.run_points(pts, workers=2, log=lambda m: None)
    assert {t for *_, t in FakeProcess.launched} == {"3"} and len(FakeProcess.launched) == 6


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """Both points fail (unknown dataset); a folder left before its first checkpoint is removed."""
    stale = tmp_path / "s" / "seed=0"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    rc = main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0,1", "--workers", "2", "--", "train", "no-such-data"])
    out = capsys.readouterr().out
    assert rc == 1 and f"removed {stale}" in out and out.count("FAILED") == 2
    rows = json.loads((tmp_path / "s" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "failed"] and not stale.exists()
    assert rows[0]["returncode"] == 2 and rows[0]["stage"] == "train"
    assert rows[0]["error"].startswith("hvae-fast: error: unknown dataset 'no-such-data'")


def test_a_real_point_trains_evaluates_and_fills_the_table(tmp_path, shared_data, capsys):
    assert main(["sweep", "one", "--root", str(tmp_path), "--grid", "rho=0.7", *FAST_EVAL, "--", *TINY]) == 0, \
        (tmp_path / "one" / "logs" / "rho=0.7.train.err").read_text()
    out = capsys.readouterr().out
    assert "[1/1] start rho=0.7" in out and "[1/1] done rho=0.7" in out
    row = json.loads((tmp_path / "one" / "results.json").read_text())[0]
    ev = json.loads((tmp_path / "one" / "rho=0.7" / "eval-valid.json").read_text())
    assert row["rho"] == 0.7 and row["step"] == 4 and ev["iw_samples"] == 5 and ev["num_examples"] == 32
    for k in ("elbo", "iw_bound", "top_kl"):
        assert row[k] == ev[k]
    assert [row[f"kl_layer_{i}"] for i in range(1, 5)] == ev["kl_per_layer"]
    assert [row[f"active_units_layer_{i}"] for i in range(1, 5)] == ev["active_units"]


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions ``path`` (Linux /proc)."""
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (p / "cmdline").read_bytes() and (p / "stat").read_text().split()[2] != "Z":
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills rely on Linux's parent-death signal")
def test_kill_9_mid_sweep_then_rerun_finishes_without_redoing_points(tmp_path, shared_data):
    cmd = [sys.executable, "-m", "hvae_fast", "sweep", "k", "--root", str(tmp_path), "--grid", "seed=0,1,2",
           *FAST_EVAL, "--", *TINY]
    first = tmp_path / "k" / "seed=0" / "eval-valid.json"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # into the second point's train
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # the point's own train process dies with the sweep (PR_SET_PDEATHSIG)
    while processes_naming(tmp_path / "k") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(tmp_path / "k") == []
    stamp = first.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "1/3 points already finished: skipped" in r.stdout and "start seed=0" not in r.stdout
    assert first.stat().st_mtime_ns == stamp
    rows = json.loads((tmp_path / "k" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["finished"] * 3


# -- summary -------------------------------------------------------------------------------------------

def test_summary_mean_std_n_over_seeds_by_hand(tmp_path):
    d = make_sweep(tmp_path, "s", [("grid", "rho=0.5,0.9"), ("grid", "seed=0,1,2")])
    elbos = {("0.5", "0"): -90.0, ("0.5", "1"): -88.0, ("0.5", "2"): -85.0, ("0.9", "0"): -80.0}
    for (rho, seed), e in elbos.items():  # rho=0.9 has one finished seed; the others are pending
        fake_point(d, f"rho={rho},seed={seed}", rho=float(rho), elbo=e, active_units=[int(-e) % 7, 1, 0, 0])
    rows = sweep.write_results(d)
    assert [r["status"] for r in rows] == ["finished"] * 4 + ["pending"] * 2
    summ = {s["rho"]: s for s in json.loads((d / "summary.json").read_text())}
    assert summ[0.5]["n"] == 3 and "seed" not in summ[0.5]
    assert summ[0.5]["elbo_mean"] == pytest.approx((-90 - 88 - 85) / 3)
    assert summ[0.5]["elbo_std"] == pytest.approx(math.sqrt(19 / 3))  # deviations -7/3, -1/3, 8/3; n - 1 = 2
    assert summ[0.5]["active_units_total_mean"] == pytest.approx((7 + 5 + 2) / 3)  # 90 % 7 + 1, 88 % 7 + 1, 85 % 7 + 1
    assert summ[0.9]["n"] == 1 and summ[0.9]["elbo_mean"] == -80.0 and summ[0.9]["elbo_std"] is None
    srows = list(csv.DictReader(open(d / "summary.csv")))
    assert srows[1]["elbo_std"] == "" and srows[1]["n"] == "1"


def test_a_sweep_without_axes_is_one_point_named_base(tmp_path):
    d = make_sweep(tmp_path, "one", [])
    fake_point(d, "base", elbo=-91.0)
    (rows,) = sweep.write_results(d)
    assert (rows["name"], rows["status"], rows["elbo"]) == ("base", "finished", -91.0)


# -- critical rho --------------------------------------------------------------------------------------

def test_bisection_pins_the_critical_rho_with_a_fake_runner():
    calls = []

    def measure(rho):  # three seeds; the top layer collapses above 0.6
        calls.append(rho)
        return [5.0 + s if rho < 0.6 else 0.01 * s for s in range(3)]

    res = sweep.bisect_critical(measure, 0.0, 1.0, 4, threshold=1.0)
    assert calls == [0.5, 0.75, 0.625, 0.5625]
    assert (res["low"], res["high"], res["runs"]) == (0.5625, 0.625, 12)
    assert [h["top_kl_mean"] for h in res["history"]] == [6.0, 0.01, 0.01, 6.0]
    # The decision uses the mean over seeds: one seed above the threshold is not enough.
    res = sweep.bisect_critical(lambda rho: [3.0, 0.0, 0.0], 0.2, 0.6, 1, threshold=1.0)
    assert (res["low"], res["high"]) == (0.2, 0.4)
    with pytest.raises(HVAEError, match="no run at rho=0.5 finished"):
        sweep.bisect_critical(lambda rho: [], 0.0, 1.0, 2, threshold=1.0)


def test_critical_search_runs_points_per_group_and_writes_critical_json(tmp_path, monkeypatch, capsys):
    """The search with run_points replaced by a fake that writes each point's eval (KL 4 below rho 0.3)."""
    started = []

    def fake_run(points, workers, log):
        for p in points:
            if not p.finished():
                started.append(p.name)
                fake_point(p.dir.parent, p.name, rho=float(p.values["rho"]), top_kl=4.0 if float(p.values["rho"]) < 0.3 else 0.0)
        return {}

    monkeypatch.setattr(sweep, "run_points", fake_run)
    argv = ["sweep", "c", "--root", str(tmp_path), "--grid", "seed=0,1", "--find-critical-rho", "--threshold", "1",
            "--iterations", "3", "--", *TINY]
    assert main(argv) == 0
    assert started == ["rho=0.5,seed=0", "rho=0.5,seed=1", "rho=0.25,seed=0", "rho=0.25,seed=1",
                       "rho=0.375,seed=0", "rho=0.375,seed=1"]
    crit = json.loads((tmp_path / "c" / "critical.json").read_text())
    assert (crit[0]["low"], crit[0]["high"], crit[0]["runs"]) == (0.25, 0.375, 6)
    assert "critical rho in [0.25, 0.375]" in capsys.readouterr().out
    rows = json.loads((tmp_path / "c" / "results.json").read_text())
    assert sorted((r["rho"], r["seed"]) for r in rows) == sorted((r, s) for r in (0.25, 0.375, 0.5) for s in (0, 1))
    started.clear()
    assert main(argv) == 0 and started == []  # re-running resumes: every point is already there


def test_train_seconds_adds_each_logged_intervals_steps_over_its_rate(tmp_path):
    from hvae_fast.experiments.sweep_results import train_seconds

    run = tmp_path / "run"
    run.mkdir()
    assert train_seconds(run) is None  # no metrics.jsonl
    recs = [{"split": "train", "step": 50, "steps_per_s": 10.0},
            {"split": "train", "step": 100, "steps_per_s": 20.0},
            {"split": "valid", "step": 100, "elbo": -100.0},
            {"split": "train", "step": 100, "steps_per_s": 50.0},  # re-logged after a resume: this one counts
            {"split": "train", "step": 150, "steps_per_s": 25.0},
            {"split": "train", "step": 200}]  # no rate: its steps fall to the next rated record
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert train_seconds(run) == pytest.approx(50 / 10 + 50 / 50 + 50 / 25)
    (tmp_path / "elsewhere.jsonl").write_text((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    assert train_seconds(run) is None  # a planted link is not read
