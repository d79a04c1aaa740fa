"""`hvae-fast sweep --executor slurm` (issue 21.1): the sbatch script submitit writes for a sweep's job
array (against a golden file, with stand-ins for sbatch/srun), a tiny sweep end to end on submitit's
local executor, the checkpoint-and-requeue of a point, and the refusal to submit while jobs run."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="the slurm executor needs submitit: pip install 'hvae-fast[slurm]'")

from hvae_fast.cli import main  # noqa: E402
from hvae_fast.errors import HVAEError  # noqa: E402
from hvae_fast.experiments import sweep, sweep_slurm  # noqa: E402

from test_sweep import FAST_EVAL, TINY, make_sweep  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "sweep_array.sbatch"


def parse_args(argv):
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    sweep.register(sub)
    return sub.choices["sweep"].parse_args(argv)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun stand-ins on PATH: sbatch keeps the script it is given and answers a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kept = tmp_path / "submitted.sbatch"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {shlex.quote(str(kept))}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return kept


def test_the_sbatch_script_of_a_sweep_is_one_capped_array_with_its_resources(tmp_path, fake_slurm):
    d = make_sweep(tmp_path, "phase", [("grid", "rho=0.5,0.7,0.9"), ("grid", "seed=0,1")])
    spec = sweep.read_spec(d)
    points = [sweep.Point(d, v, spec) for v in sweep.expand(spec["axes"])]
    args = parse_args(["phase", "--executor", "slurm", "--workers", "4", "--slurm-partition", "gpu",
                       "--slurm-time", "240", "--slurm-gpus-per-task", "2", "--slurm-cpus-per-task", "8",
                       "--slurm-arg", "account=lab", "--slurm-arg", "requeue", "--", *TINY])
    jobs = sweep_slurm.submit(d, points, sweep_slurm.slurm_options(args))
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(6)]
    assert json.loads((d / "slurm" / "jobs.json").read_text()) == {p.name: f"4242_{i}" for i, p in enumerate(points)}
    script = fake_slurm.read_text().replace(str(tmp_path), "TMP").replace(shlex.quote(sys.executable), "PYTHON")
    if os.environ.get("HVAE_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    for line in ("#SBATCH --array=0-5%4", "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-task=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
                 "#SBATCH --account=lab", "#SBATCH --requeue", "#SBATCH --signal=USR2@90"):
        assert line in script.splitlines()


def test_slurm_flags_are_checked_and_without_slurm_the_error_is_one_line(tmp_path, monkeypatch, capsys):
    for bad, match in ((["--slurm-arg", "=x"], "--slurm-arg '=x'"), (["--slurm-time", "0"], "--slurm-time must be"),
                       (["--slurm-gpus-per-task", "-1"], "--slurm-gpus-per-task must be")):
        with pytest.raises(HVAEError, match=match):
            sweep_slurm.slurm_options(parse_args(["s", "--executor", "slurm", *bad, "--", *TINY]))
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    assert main(["sweep", "s", "--root", str(tmp_path), "--executor", "slurm", "--grid", "seed=0", "--", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--executor slurm" in err and "login node" in err and "Traceback" not in err


def test_a_rerun_is_refused_while_a_submitted_job_is_queued_or_running(tmp_path):
    d = make_sweep(tmp_path, "s", [("grid", "seed=0,1")])
    (d / "slurm").mkdir()
    (d / "slurm" / "jobs.json").write_text(json.dumps({"seed=0": "77_0", "seed=1": "77_1"}))
    states = {"77_0": "COMPLETED", "77_1": "PENDING"}
    with pytest.raises(HVAEError, match="jobs 77_1 of sweep s are still queued or running"):
        sweep_slurm.refuse_active_jobs(d, state=lambda folder, job: states[job])
    states["77_1"] = "CANCELLED by 0"
    sweep_slurm.refuse_active_jobs(d, state=lambda folder, job: states[job])


def test_a_stopped_point_job_checkpoints_its_train_and_requeues_a_fresh_job(tmp_path, monkeypatch):
    """checkpoint() (submitit's USR2 handler) SIGTERMs the train, waits for it, returns a new job."""
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0")])
    job = sweep_slurm.PointJob(tmp_path, {"seed": "0"}, spec)
    run = tmp_path / "seed=0"
    # a stand-in train: on SIGTERM it writes its checkpoint and exits 143, as the trainer does
    fake = ("import pathlib, signal, sys, time\n"
            f"out = pathlib.Path({str(run)!r}); out.mkdir(exist_ok=True)\n"
            "def stop(*a):\n    (out / 'checkpoint-latest.pt').write_bytes(b'ckpt'); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n(out / 'started').touch()\ntime.sleep(60)\n")
    monkeypatch.setattr(sweep.Point, "train_cmd", lambda self, resume=False: [sys.executable, "-c", fake])
    import threading

    result = {}
    runner = threading.Thread(target=lambda: result.update(job()))
    runner.start()
    deadline = time.monotonic() + 30
    while not (run / "started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    requeued = job.checkpoint()
    runner.join(10)
    assert result["status"] == "interrupted" and (run / "checkpoint-latest.pt").read_bytes() == b"ckpt"
    assert isinstance(requeued.function, sweep_slurm.PointJob) and requeued.function is not job
    # the requeued job resumes the point from that checkpoint
    assert requeued.function.__getstate__() == job.__getstate__()
    stages = sweep.Point(tmp_path, {"seed": "0"}, spec).stages(print)
    assert stages[0][0] == "train"


def test_a_tiny_sweep_runs_end_to_end_on_submitits_local_executor(tmp_path, shared_data, monkeypatch):
    """The same folder, tables and report inputs as --executor local; growing the sweep adds a point."""
    real = sweep_slurm.run_on_submitit  # cmd_sweep imports it when it runs: the local cluster stands in for SLURM
    monkeypatch.setattr(sweep_slurm, "run_on_submitit", lambda d, pts, opts, log=print: real(d, pts, opts, log, "local"))
    args = ["sweep", "t", "--root", str(tmp_path), "--executor", "slurm", "--workers", "2", *FAST_EVAL]
    assert main([*args, "--grid", "seed=0", "--", *TINY]) == 0
    rows = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [(r["name"], r["status"], r["step"]) for r in rows] == [("seed=0", "finished", 4)]
    assert (tmp_path / "t" / "seed=0" / "eval-valid.json").exists() and (tmp_path / "t" / "summary.csv").exists()
    assert main([*args, "--grid", "seed=0,1", "--", *TINY]) == 0  # grows: seed=0 is skipped, seed=1 runs
    rows = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [(r["name"], r["status"]) for r in rows] == [("seed=0", "finished"), ("seed=1", "finished")]
    assert list(json.loads((tmp_path / "t" / "slurm" / "jobs.json").read_text())) == ["seed=1"]



def test_a_torchrun_point_is_one_task_whose_train_starts_n_processes(tmp_path, capsys):
    assert main(["sweep", "t", "--root", str(tmp_path), "--grid", "seed=0", "--nproc-per-point", "2",
                 "--print-commands", "--", *TINY]) == 0
    train = capsys.readouterr().out.split(" && ")[0]
    assert f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 -m hvae_fast train " in train
    args = parse_args(["t", "--executor", "slurm", "--nproc-per-point", "2", "--slurm-gpus-per-task", "2", "--", *TINY])
    opts = sweep_slurm.slurm_options(args)
    assert opts["ntasks_per_node"] == 1 and opts["nodes"] == 1 and opts["gpus_per_task"] == 2
    # the process count is part of the spec: a run resumes only with the processes it started with
    d = make_sweep(tmp_path, "s", [("grid", "seed=0")])
    assert main(["sweep", "s", "--root", str(tmp_path), "--grid", "seed=0", "--nproc-per-point", "2", "--", *TINY]) == 2
    assert "differs in nproc_per_point" in capsys.readouterr().err and "nproc_per_point" not in sweep.read_spec(d)


def test_a_point_job_with_a_planted_log_symlink_is_refused_and_leaves_its_target(tmp_path, monkeypatch):
    spec = sweep.make_spec(TINY, [sweep.parse_axis("grid", "seed=0")])
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "seed=0.train.log").symlink_to(outside)

    def no_process(*a, **k):
        raise AssertionError("the job started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    result = sweep_slurm.PointJob(tmp_path, {"seed": "0"}, spec)()
    assert result["status"] == "refused" and "seed=0.train.log is a symbolic link" in result["message"]
    assert outside.read_text() == "mine"
