"""The sweep against a hostile or careless user (issue 18, items 1, 2, 6, 12): it owns only its own
runs (a held train lock keeps a point's folder; one sweep per folder), its point folders never leave
the sweep folder, and a tampered or damaged file it reads is one line naming the file."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvae_fast.cli import main
from hvae_fast.errors import HVAEError
from hvae_fast.experiments import sweep
from hvae_fast.experiments.report import make_report

from test_sweep import REPO, TINY, fake_point, make_sweep

SLOW_TRAIN = [a if a != "4" else "100000" for a in TINY]  # a train that is still running when stopped


def no_process(*a, **k):
    raise AssertionError("the sweep started a process")


def wait_for(cond, what: str, proc=None, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not cond():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# -- 18.1: a sweep never takes a folder that a process holds ---------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP/flock semantics of Linux")
def test_a_stopped_train_keeps_its_point_folder_and_the_sweep_names_the_busy_point(tmp_path, shared_data, monkeypatch,
                                                                                 capsys):
    run = tmp_path / "s" / "seed=0"
    proc = subprocess.Popen([sys.executable, "-m", "hvae_fast", *SLOW_TRAIN, "--seed", "0", "--out", str(run),
                             "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / ".train.lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid), "the train lock", proc)
        os.kill(proc.pid, signal.SIGSTOP)
        before = sorted(p.name for p in run.iterdir())
        monkeypatch.setattr(subprocess, "Popen", no_process)
        rc = main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--", *SLOW_TRAIN])
        out = capsys.readouterr().out
        assert rc == 1 and f"BUSY seed=0: {run} is in use by process {proc.pid}" in out
        assert "1 busy (left untouched: seed=0)" in out
        assert sorted(p.name for p in run.iterdir()) == before and lock.read_text().strip() == str(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_checkpointed_point_whose_lock_is_held_is_not_resumed(tmp_path):
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0")])
    p = sweep.Point(tmp_path, {"seed": "0"}, spec)
    p.dir.mkdir()
    (p.dir / "checkpoint-latest.pt").write_bytes(b"ckpt")
    with open(p.dir / ".train.lock", "a+") as held:  # another open file: flock refuses the sweep's
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(sweep.PointBusy, match="in use by process 4242 .*kill 4242"):
            p.stages(print)
    assert (p.dir / "checkpoint-latest.pt").read_bytes() == b"ckpt"
    assert p.stages(print)[0][1][-1] == "--resume"  # released: resumed as before


def test_a_folder_with_files_that_are_not_a_runs_is_left_alone(tmp_path, monkeypatch, capsys):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0")])
    (d / "seed=0").mkdir()
    (d / "seed=0" / "notes.txt").write_text("mine")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--", *TINY]) == 1
    out = capsys.readouterr().out
    assert "REFUSED seed=0:" in out and "holds files that are not a run's (notes.txt)" in out
    assert (d / "seed=0" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock semantics of Linux")
def test_a_second_sweep_of_one_name_is_refused_naming_the_first(tmp_path, shared_data, capsys):
    cmd = [sys.executable, "-m", "hvae_fast", "sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--",
           *SLOW_TRAIN]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "s" / "seed=0" / ".train.lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip().isdigit(), "the first sweep's train", first)
        assert main(cmd[3:]) == 2
        err = one_error_line(capsys)
        assert f"sweep s is already running in {tmp_path / 's'} (process {first.pid})" in err
        assert f"kill {first.pid}" in err and lock.exists()
    finally:
        first.kill()
        first.wait()


def test_a_rerun_appends_to_a_points_logs_and_reports_this_attempts_error(tmp_path, capsys):
    args = ["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--", "train", "no-such-data"]
    assert main(args) == 1 and main(args) == 1
    err = (tmp_path / "s" / "logs" / "seed=0.train.err").read_text()
    assert err.count("# ") >= 2 and err.count("unknown dataset 'no-such-data'") == 2  # both attempts kept
    failed = json.loads((tmp_path / "s" / "logs" / "seed=0.failed.json").read_text())
    assert failed["error"].startswith("hvae-fast: error: unknown dataset") and failed["returncode"] == 2


@pytest.mark.parametrize("suffix", ["train.log", "train.err"])
def test_a_planted_log_symlink_is_not_followed_and_is_named(tmp_path, suffix):
    """logs/<point>.train.log / .err opened for appending never write through a planted link."""
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0")])
    p = sweep.Point(tmp_path / "s", {"seed": "0"}, spec)
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    p.logs.mkdir(parents=True)
    link = p.logs / f"{p.name}.{suffix}"
    link.symlink_to(outside)
    from hvae_fast.experiments.sweep_points import open_logs

    with pytest.raises(sweep.PointRefused, match=f"the log file {link} is a symbolic link"):
        open_logs(p, "train", p.train_cmd())
    assert outside.read_text() == "mine" and link.is_symlink()


def test_a_sweep_with_a_planted_log_symlink_names_it_and_leaves_its_target(tmp_path, monkeypatch, capsys):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0")])
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    (d / "logs").mkdir()
    link = d / "logs" / "seed=0.train.err"
    link.symlink_to(outside)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--", *TINY]) == 1
    out = capsys.readouterr().out
    assert f"REFUSED seed=0: the log file {link} is a symbolic link" in out and "Traceback" not in out
    # named as refused, not as busy: waiting for another process would not help
    assert "1 refused (left untouched, see the lines above: seed=0)" in out and "busy" not in out
    assert outside.read_text() == "mine"
    (d / "logs").rename(tmp_path / "planted-logs")
    (d / "logs").symlink_to(tmp_path / "planted-logs")  # the folder itself planted as a link
    before = {p.name: p.read_bytes() for p in (tmp_path / "planted-logs").iterdir() if not p.is_symlink()}
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--", *TINY]) == 1
    assert f"REFUSED seed=0: the log folder {d / 'logs'} is a symbolic link" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in (tmp_path / "planted-logs").iterdir() if not p.is_symlink()}
    assert outside.read_text() == "mine" and after == before


# -- 18.2: point folders stay inside the sweep folder ------------------------------------------------

HOSTILE = ["0/../../../../x", "/a", "..", ".", ".hidden", "a b", "x" * 300, "../../etc", "~", "-1"]


def test_point_names_are_one_folder_inside_the_sweep_and_distinct(tmp_path):
    names = [sweep.point_name({"v": v}) for v in HOSTILE]
    assert len(set(names)) == len(names)
    for n in names:
        assert "/" not in n and n not in (".", "..") and len(n.encode()) <= sweep_spec_limit()
        assert (tmp_path / n).resolve().parent == tmp_path.resolve()
    # plain values keep their readable names (existing sweep folders keep theirs)
    assert sweep.point_name({"rho": "0.5", "latent_sizes": "40,40", "seed": "-1"}) == "rho=0.5,latent_sizes=40-40,seed=-1"
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "v=" + ";".join(HOSTILE))])
    from hvae_fast.experiments.sweep_spec import parse_point_name
    assert [parse_point_name(n, spec) for n in names] == [{"v": v} for v in HOSTILE]


def sweep_spec_limit():
    from hvae_fast.experiments.sweep_spec import NAME_BYTES
    return NAME_BYTES


def test_values_that_are_paths_reach_train_unchanged_and_nothing_leaves_the_sweep(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    launched = []

    class Failing:  # every train fails: its .failed.json and logs are written under the point's name
        def __init__(self, cmd, **kw):
            launched.append(cmd)
            self.returncode = 1

        def poll(self):
            return 1

    monkeypatch.setattr(subprocess, "Popen", Failing)
    rc = main(["sweep", "s", "--root", str(root), "--grid", "seed=0,0/../../../x", "--grid", "data_dir=/a,/b",
               "--", *TINY])
    assert rc == 1 and (outside / "keep").read_text() == "mine"
    outs = [Path(c[c.index("--out") + 1]) for c in launched]
    assert len(outs) == 4 and all(o.parent == root / "s" for o in outs)
    assert sorted((c[c.index("--seed") + 1], c[c.index("--data-dir") + 1]) for c in launched) == \
        sorted((s, d) for s in ("0", "0/../../../x") for d in ("/a", "/b"))
    for p in tmp_path.rglob("*"):  # every file the sweep wrote is in its folder
        assert p in (outside, root) or p.is_relative_to(outside) or p.is_relative_to(root / "s"), p
    rows = json.loads((root / "s" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert {(r["seed"], r["data_dir"]) for r in rows} == {(s, d) for s in (0, "0/../../../x") for d in ("/a", "/b")}


def test_a_spec_file_with_path_values_stays_inside(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"base": TINY, "grid": {"data_dir": ["../../up", "/abs/dir"]}}))
    assert main(["sweep", "s", "--root", str(tmp_path / "r"), "--spec", str(spec), "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, value in zip(lines, ("../../up", "/abs/dir")):
        out = Path(line.split(" --out ")[1].split()[0].strip("'"))
        assert out.parent == tmp_path / "r" / "s" and f"--data-dir {value} " in line.replace("'", "")


def test_a_flag_name_with_a_slash_is_a_usage_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "s", "--root", str(tmp_path), "--grid", "a/b=1", "--print-commands", "--", *TINY])
    assert e.value.code == 2 and "is not a train flag name" in capsys.readouterr().err


# -- 18.6: damaged sweep files are one line naming the file ------------------------------------------

SPEC_ARGS = ["--grid", "seed=0,1"]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON|unreadable"),
    ("", "unreadable"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"base": TINY, "eval_iw_samples": 100}), "no 'axes'"),
    (json.dumps({"base": TINY, "axes": "seed", "eval_iw_samples": 100}), "'axes' is not a list"),
    (json.dumps({"base": TINY, "axes": [{"kind": "grid", "key": "seed", "values": [0, 1]}], "eval_iw_samples": 100}),
     "is not {kind"),
    (json.dumps({"base": TINY, "axes": [], "eval_iw_samples": "100"}), "'eval_iw_samples' is not an integer"),
    ("[" * 100000, "unreadable"),
])
def test_a_damaged_sweep_json_is_one_line_for_sweep_and_report(tmp_path, monkeypatch, capsys, content, problem):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0,1")])
    (d / "sweep.json").write_text(content)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert main(["sweep", "s", "--root", str(tmp_path), *SPEC_ARGS, "--", *TINY]) == 2
    err = one_error_line(capsys)
    assert f"{d / 'sweep.json'} is damaged" in err
    import re
    assert re.search(problem, err), err
    assert main(["report", str(d)]) == 2
    assert f"{d / 'sweep.json'} is damaged" in one_error_line(capsys)
    assert (d / "sweep.json").read_text() == content  # nothing rewritten


def finished_sweep(tmp_path):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0,1")])
    for s in "01":
        fake_point(d, f"seed={s}")
    return d


@pytest.mark.parametrize("file, content, problem", [
    ("seed=0/config.json", [1], "not a JSON object"),
    ("seed=0/config.json", {"method": "hvae", "ou": "0.5"}, "'ou' is not an object"),
    ("seed=0/config.json", {"method": "hvae", "ou": {"rho": "high"}}, "'ou.rho' is not a number"),
    ("seed=0/config.json", {"train": {"steps": [5]}}, "'train.steps' is not an integer"),
    ("seed=1/eval-valid.json", [], "not a JSON object"),
    ("seed=1/eval-valid.json", {"elbo": "-90"}, "'elbo' is not a number"),
    ("seed=1/eval-valid.json", {"elbo": -90.0, "kl_per_layer": 5}, "'kl_per_layer' is not a list"),
    ("seed=1/eval-valid.json", {"elbo": -90.0, "active_units": ["a"]}, "'active_units' is not a list"),
    ("seed=1/eval-valid.json", {"elbo": -90.0, "step": "5"}, "'step' is not an integer"),
])
def test_a_points_damaged_config_or_eval_is_one_line_naming_it(tmp_path, monkeypatch, capsys, file, content, problem):
    d = finished_sweep(tmp_path)
    (d / file).write_text(json.dumps(content))
    monkeypatch.setattr(subprocess, "Popen", no_process)
    assert main(["sweep", "s", "--root", str(tmp_path), *SPEC_ARGS, "--", *TINY]) == 2
    err = one_error_line(capsys)
    assert f"{d / file} is damaged: {problem}" in err


@pytest.mark.parametrize("content", [[1], {"stage": 3, "returncode": 1}, {"stage": "train", "returncode": "1"},
                                     {"stage": "train", "returncode": 1, "status": "x"}, "{broken"])
def test_a_damaged_failed_json_is_one_line_naming_it(tmp_path, capsys, content):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0")])
    (d / "logs").mkdir()
    path = d / "logs" / "seed=0.failed.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if content == {"stage": "train", "returncode": 1, "status": "x"}:  # extra keys are dropped, not a clash
        assert sweep.collect_results(d)[0]["status"] == "failed"
        return
    with pytest.raises(HVAEError, match=f"{path} is damaged"):
        sweep.write_results(d)


@pytest.mark.parametrize("content", [[], [1], [{"low": "0.5", "high": 0.6, "threshold": 1, "iterations": 4, "runs": 8}],
                                     {"low": 0.5}, "nonsense",
                                     [{"low": 0.5, "high": 0.6, "threshold": 1, "iterations": 1, "runs": 2,
                                       "history": [{"rho": "0.55", "top_kl_mean": 0.0}]}],
                                     [{"low": 0.5, "high": 0.6, "threshold": 1, "iterations": 1, "runs": 2,
                                       "history": "0.55"}]])
def test_a_damaged_critical_json_is_one_line_for_report(tmp_path, capsys, content):
    d = finished_sweep(tmp_path)
    (d / "critical.json").write_text(json.dumps(content) if content != "nonsense" else content)
    assert main(["report", str(d), "--output", str(tmp_path / "out")]) == 2
    assert f"{d / 'critical.json'} is damaged" in one_error_line(capsys)


@pytest.mark.parametrize("record, problem", [
    ({"split": "train", "step": 2, "top_kl": 1.0}, "has no number 'elbo'"),
    ({"split": "train", "step": "2", "elbo": -90.0, "top_kl": 1.0}, "'step' that is not an integer"),
    ({"split": "train", "step": [2], "elbo": -90.0, "top_kl": 1.0}, "'step' that is not an integer"),
    ({"split": "train", "step": 2, "elbo": "-90", "top_kl": 1.0}, "an 'elbo' that is not a number"),
    ({"split": "valid", "step": 2, "elbo": -90.0, "active_units": "40"}, "'active_units' that are not"),
])
def test_wrongly_typed_metrics_fields_are_one_line_for_plot(tmp_path, capsys, record, problem):
    run = tmp_path / "run"
    run.mkdir()
    good = {"split": "train", "step": 1, "elbo": -95.0, "top_kl": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n" + json.dumps(good) + "\n")
    assert main(["plot", str(run), "--output", str(tmp_path / "c.png")]) == 2
    err = one_error_line(capsys)
    assert f"{run / 'metrics.jsonl'}" in err and problem in err


def test_the_first_write_of_sweep_json_is_atomic(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0")])
    with pytest.raises(HVAEError, match="No space left"):
        sweep.prepare(tmp_path / "s", spec)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []  # no half-written spec, no temp left


def test_report_reads_a_damaged_eval_as_one_line(tmp_path, capsys):
    d = finished_sweep(tmp_path)
    (d / "seed=1" / "eval-valid.json").write_text(json.dumps({"elbo": -90.0, "active_units": 5}))
    with pytest.raises(HVAEError, match="eval-valid.json is damaged"):
        make_report(d, tmp_path / "out")


def test_existing_sweeps_keep_their_folder_names():
    """Values that were plain before the hashing (schedules with ':' and '=') name folders as they did."""
    assert sweep.point_name({"rho_schedule": "linear:0.5:1.0:15000:hold=2000", "rho_control": "25"}) == \
        "rho_schedule=linear:0.5:1.0:15000:hold=2000,rho_control=25"
    assert sweep.point_name({"v": "_a~6a50dc85"}) != sweep.point_name({"v": "/a"})  # '~' only marks a hash
