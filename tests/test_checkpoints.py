"""Checkpoints: weights_only loading, atomic writes, nothing lost on signals / divergence / OOM, and
the training log's status lines."""

import errno
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hvae_fast.training.trainer as T
import hvae_fast.training.rundir as R
from hvae_fast.cli import main
from hvae_fast.config import preset_config
from hvae_fast.errors import HVAEError
from hvae_fast.training.rundir import atomic_save, load_checkpoint
from hvae_fast.training.trainer import Trainer, format_duration, scale_notes

from conftest import sigterm_in_step
from test_trainer_cli import run_cli, tiny_config

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hvae_fast"


def cli_train(out, data, *extra, steps=6):
    """argv of a tiny `train` run: the smallest MNIST preset, the reference OU backend, CPU."""
    # --backend is an OU flag: only the hvae runs (the preset's default method) take it.
    backend = [] if "--method" in extra and "hvae" not in extra else ["--backend", "torch"]
    return ["train", "binarized-mnist", "--preset", "mnist-mlp-40x4", *backend, "--device", "cpu",
            "--steps", str(steps), "--batch-size", "16", "--log-every", "2", "--eval-every", "1000",
            "--eval-examples", "64", "--sample-every", "1000", "--data-dir", str(data), "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}: set HVAE_DATA_DIR")
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(tiny_config(steps=4, log_every=2, eval_every=2), out, data_dir=SHARED_DATA, progress=False).fit()
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(R.LOCK_NAME))
    return dst


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(f.name, m.group(0)) for f in PACKAGE.rglob("*.py")
             for m in re.finditer(r"torch\.load\([^)]*\)", f.read_text())]
    assert calls, "the package loads checkpoints somewhere"
    assert all("weights_only=True" in c for _, c in calls), calls


def test_checkpoints_hold_only_plain_types_and_load_weights_only(tiny_run):
    st = load_checkpoint(tiny_run / "checkpoint-latest.pt", "cpu")

    def walk(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, (str, int)), where
                walk(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
        else:
            assert v is None or isinstance(v, (torch.Tensor, bool, int, float, str)), (where, type(v))

    walk(st, "checkpoint")
    assert st["step"] == 4 and st["optimizer"]["state"] and isinstance(st["rng_cpu"], torch.Tensor)
    assert st["config"]["train"]["steps"] == 4


class Payload:
    """Unpickling this calls open(marker, "w"): a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def in_process(*argv):
    """run_cli's result for `hvae-fast ARGV` run by cli.main in this process (fast)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, "", err.getvalue())


@pytest.mark.parametrize("runner", [in_process, run_cli])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(tiny_run, tmp_path, shared_data, runner):
    # The payload is live: a plain torch.load would create the marker file.
    probe = tmp_path / "probe"
    torch.save({"model": Payload(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    run = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = {**torch.load(run / "checkpoint-latest.pt", weights_only=True), "model": Payload(marker)}
    for name in ("checkpoint-latest.pt", "checkpoint-best.pt"):
        torch.save(evil, run / name)
    for argv in (["eval", str(run), "--device", "cpu", "--data-dir", str(shared_data)],
                 ["sample", str(run), "--device", "cpu", "-n", "4"],
                 ["train", "binarized-mnist", "--out", str(run), "--resume", "--data-dir", str(shared_data),
                  "--no-progress"]):
        p = runner(*argv)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr and err[-1].startswith("hvae-fast: error: refusing to load")
        assert "(io.open)" in err[-1]
        assert not marker.exists(), argv


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-latest.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(HVAEError) as e:
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    msg = str(e.value)
    assert "No space left on device" in msg and "free disk space" in msg and "\n" not in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-latest.pt"]


@pytest.mark.parametrize("key", ["model", "optimizer", "stream", "config"])
def test_a_checkpoint_missing_an_entry_names_it(tiny_run, tmp_path, shared_data, key):
    run = copy_run(tiny_run, tmp_path / "run")
    st = torch.load(run / "checkpoint-latest.pt", weights_only=True)
    del st[key]
    torch.save(st, run / "checkpoint-latest.pt")
    with pytest.raises(HVAEError, match=f"has no '{key}' entry"):
        Trainer(tiny_config(steps=4, log_every=2, eval_every=2), run, data_dir=shared_data, resume=True, progress=False)
    if key == "model":
        torch.save(st, run / "checkpoint-best.pt")
        with pytest.raises(HVAEError, match="has no 'model' entry"):
            R.load_run(run, "cpu")


def test_resume_checks_the_config_inside_the_checkpoint(tmp_path, shared_data, capsys):
    out = tmp_path / "vae"
    assert main(cli_train(out, shared_data, "--method", "vae", steps=2)) == 0
    (out / "config.json").unlink()
    capsys.readouterr()
    assert main(cli_train(out, shared_data, "--method", "hvae", "--resume", steps=2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the checkpoint's in method;" in err



def test_a_checkpoint_from_before_a_config_field_existed_resumes(tmp_path, shared_data, capsys):
    """A field added to the config after a run was written takes its default, not a resume refusal."""
    out = tmp_path / "old"
    assert main(cli_train(out, shared_data, steps=2)) == 0
    path = out / "checkpoint-latest.pt"
    st = load_checkpoint(path, "cpu")
    for section, name in (("ou", "rho_schedule"), ("ou", "rho_min"), ("train", "checkpoint_minutes")):
        del st["config"][section][name]  # as written by a version without these fields
    torch.save(st, path)
    assert main(cli_train(out, shared_data, "--resume", steps=4)) == 0, capsys.readouterr().err
    assert load_checkpoint(path, "cpu")["step"] == 4
    st["config"]["ou"]["rho"] = 0.5  # a real difference is still refused
    torch.save(st, path)
    assert main(cli_train(out, shared_data, "--resume", steps=6)) == 2
    assert "differs from the checkpoint's in ou.rho;" in capsys.readouterr().err

def test_divergence_keeps_the_last_finite_weights(tmp_path, shared_data, monkeypatch, capsys):
    # lr 1e30: step 1 (finite) moves every weight to ~1e30, from where every loss is inf. Saves are
    # due every step, but a periodic checkpoint is written only once the next step is finite, so
    # checkpoint-latest.pt keeps the initial weights.
    monkeypatch.setattr(T, "MAX_CONSECUTIVE_NONFINITE", 5)
    out = tmp_path / "run"
    assert main(cli_train(out, shared_data, "--lr", "1e30", "--checkpoint-every", "1", "--log-every", "1", steps=40)) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN/inf for 5 steps in a row (step 5)" in err and "last good state (step 0)" in err
    st = load_checkpoint(out / "checkpoint-latest.pt", "cpu")
    assert st["step"] == 0
    assert max(p.abs().max().item() for p in st["model"].values() if p.is_floating_point()) < 100


def test_checkpoints_come_early_and_at_least_every_checkpoint_minutes(tmp_path, shared_data, monkeypatch):
    saved = []
    orig = Trainer.save

    def record(self, name="checkpoint-latest.pt", position=None):
        ok = orig(self, name, position)
        if name == "checkpoint-latest.pt":
            saved.append(self._saved_step)
        return ok

    monkeypatch.setattr(Trainer, "save", record)
    # Step 0, the first logged step (3), then the end (checkpoint_every is far away).
    cfg = tiny_config(steps=7, log_every=3, eval_every=100, checkpoint_every=1000, checkpoint_minutes=60)
    Trainer(cfg, tmp_path / "a", data_dir=shared_data, progress=False).fit()
    assert saved == [0, 3, 7]
    saved.clear()
    # A tiny time budget makes a checkpoint due after every step.
    cfg = tiny_config(steps=5, log_every=3, eval_every=100, checkpoint_every=1000, checkpoint_minutes=1e-9)
    Trainer(cfg, tmp_path / "b", data_dir=shared_data, progress=False).fit()
    assert saved == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_names_the_flags_to_lower(tmp_path, shared_data, monkeypatch, capsys, exc):
    def step(self, x):
        raise exc

    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(cli_train(tmp_path / "run", shared_data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory in training step 1" in err
    for flag in ("--batch-size", "--ou-samples", "--iw-samples-train"):
        assert flag in err


def test_other_runtime_errors_keep_their_traceback(tmp_path, shared_data, monkeypatch):
    def step(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(RuntimeError, match="shapes"):
        main(cli_train(tmp_path / "run", shared_data))


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 45, 725, 3 * 3600 + 7 * 60 + 20, 2 * 86400 + 4 * 3600 + 59)] == \
        ["0 s", "45 s", "12 min 05 s", "3 h 07 min", "2 d 04 h"]


def test_validations_left_count_every_eval_every_and_the_last_step():
    from hvae_fast.training.trainer import validations_left

    # (step just done, steps, eval_every): the passes at steps >= step, its own included
    cases = {(1, 10, 5): 2, (5, 10, 5): 2, (6, 10, 5): 1, (10, 10, 5): 1, (1, 14, 100): 1, (14, 14, 100): 1,
             (3, 7, 2): 3, (4, 7, 2): 3, (7, 7, 2): 1, (0, 10, 5): 2, (11, 10, 5): 0, (20, 300_000, 5000): 60}
    assert {k: validations_left(*k) for k in cases} == cases


def test_eta_counts_the_validations_still_to_come():
    from hvae_fast.training.trainer import eta_seconds

    # 980 steps of 0.1 s and 10 validations of 30 s to come: 398 s, where the steps alone say 98 s
    assert eta_seconds(20, 1000, 0.1, 100, 30.0) == pytest.approx(98 + 300)
    assert eta_seconds(1000, 1000, 0.1, 100, 30.0) == pytest.approx(30.0)  # the last validation
    assert eta_seconds(1000, 1000, 0.1, 2000, 0.0) == 0.0


def _simulated_run(steps, eval_every, step_s, valid_s, valid_batches, slow_steps=(), first_s=5.0):
    """Feed a Pace the clock of a run (first step ``first_s``, steps ``slow_steps`` slower by 3x, a
    validation of ``valid_s`` every ``eval_every`` steps and at the end): (first estimate, the real
    seconds from that moment to the end)."""
    pace, now, told = T.Pace(0, valid_batches), 0.0, None
    for step in range(1, steps + 1):
        now += first_s if step == 1 else step_s * (3 if step in slow_steps else 1)
        pace.step_done(step, now)
        if told is None and pace.first_estimate_due(step, now):
            told = (pace.eta(step, steps, eval_every, now), now)
        if step % eval_every == 0 or step == steps:
            now += valid_s
            pace.validated(valid_s)
    assert told is not None
    return told[0], now - told[1]


@pytest.mark.parametrize("steps, eval_every, step_s, valid_s, valid_batches", [
    (1000, 2000, 0.05, 1.0, 20),  # the quick start: one validation, at the end
    (2000, 100, 0.1, 6.0, 80),  # frequent, long validations: the steps alone are 1/4 of the time
    (300_000, 5000, 0.5, 20.0, 16),  # CIFAR-10 on a GPU
    (500, 50, 1.0, 40.0, 40),  # a CPU run validating all examples often
])
def test_the_first_eta_is_within_1_5x_of_the_simulated_run(steps, eval_every, step_s, valid_s, valid_batches):
    """Warm-up steps slower than the rest are not timed, validations to come are counted: the first
    estimate is within 1.5x of the time the run then takes (no real timing here)."""
    est, real = _simulated_run(steps, eval_every, step_s, valid_s, valid_batches, slow_steps=range(2, 7))
    assert real / 1.5 <= est <= real * 1.5, (est, real)


def test_scale_notes_point_a_cpu_run_of_a_gpu_preset_to_a_cpu_sized_one():
    cifar = preset_config("cifar10-resnet-3-skip")
    notes = scale_notes(cifar, torch.device("cpu"), 9_950_000)
    assert "9.95M parameters, 300000 steps of batch 64" in notes[0]
    assert len(notes) == 2 and "--steps" in notes[1] and "mnist-mlp-40x4" in notes[1]
    assert len(scale_notes(cifar, torch.device("cuda"), 9_950_000)) == 1
    assert len(scale_notes(preset_config("mnist-mlp-40x4"), torch.device("cpu"), 806_144)) == 1
    ladder = scale_notes(preset_config("cifar10-vdvae-ladder-6"), torch.device("cpu"), 160_164)  # CPU-sized
    assert len(ladder) == 1 and "160,164 parameters" in ladder[0]


def test_fit_logs_scale_eta_and_status_lines(tmp_path, shared_data, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="hvae_fast.training.trainer")
    monkeypatch.setattr(T, "STATUS_SECONDS", 1e9)
    # a short run: time 10 steps after the first, whatever they take
    monkeypatch.setattr(T, "ETA_WARMUP_STEPS", 0)
    monkeypatch.setattr(T, "ETA_STEPS", 10)
    monkeypatch.setattr(T, "ETA_SECONDS", 0.0)
    Trainer(tiny_config(steps=14, log_every=4, eval_every=100), tmp_path / "r", data_dir=shared_data, progress=False).fit()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("tiny (hvae) on cpu:" in m and "14 steps of batch 32" in m for m in msgs)
    assert any(re.search(r"steps/s over 10 steps: about .+ to step 14; 1 validation of about .+ included", m)
               for m in msgs)
    status = [m for m in msgs if m.startswith("step ")]
    # The first logged step and the last; the ones between fall inside STATUS_SECONDS.
    assert [m.split()[1] for m in status] == ["4/14", "14/14"]
    # at the last step its validation is still to come
    assert re.fullmatch(r"step 14/14  loss [\d.]+  ELBO -[\d.]+  [\d.]+ steps/s  ETA \d+ s", status[-1])
    caplog.clear()
    monkeypatch.setattr(T, "STATUS_SECONDS", 0.0)  # then every logged step has its line
    Trainer(tiny_config(steps=10, log_every=4, eval_every=100), tmp_path / "s", data_dir=shared_data, progress=False).fit()
    assert [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("step ")] == ["4/10", "8/10", "10/10"]


def test_a_signal_stops_after_the_step_and_the_resumed_run_ends_bit_identical(tmp_path, shared_data, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(cli_train(full, shared_data, steps=5)) == 0
    orig = sigterm_in_step(monkeypatch, 2)  # arrives inside step 3, which still completes
    part = tmp_path / "part"
    capsys.readouterr()
    assert main(cli_train(part, shared_data, steps=5)) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"hvae-fast: stopped by SIGTERM after step 3; checkpoint-latest.pt holds step 3: resume with "
                    f"`hvae-fast train binarized-mnist --out {part} --resume --data-dir {shared_data}`")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer put the handlers back
    monkeypatch.setattr(Trainer, "train_step", orig)
    assert main(shlex.split(last.split("`")[1])[1:] + ["--no-progress"]) == 0
    a, b = (load_checkpoint(d / "checkpoint-latest.pt", "cpu") for d in (full, part))
    assert a["step"] == b["step"] == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_sigint_checkpoints_the_current_step_and_prints_the_resume_command(tmp_path, shared_data):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "hvae_fast", *cli_train(out, shared_data, steps=100_000)]
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if re.search(r"step \d+/100000", line):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"hvae-fast: stopped by SIGINT after step (\d+); checkpoint-latest.pt holds step \1: "
                     r"resume with `(hvae-fast train .*)`", last)
    assert m, last
    step = int(m.group(1))
    assert load_checkpoint(out / "checkpoint-latest.pt", "cpu")["step"] == step
    q = run_cli(*shlex.split(m.group(2))[1:], "--steps", str(step + 2), "--no-progress")
    assert q.returncode == 0, q.stderr
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == step + 2


def test_build_training_assembles_model_optimizer_schedule_and_smoothing():
    cfg = preset_config("mnist-mlp-40x4")
    cfg.ou.backend, cfg.train.optimizer, cfg.train.lr = "torch", "adamax", 5e-3
    tr = T.build_training(cfg, "cpu")
    assert isinstance(tr.opt, torch.optim.Adamax) and tr.backend == "torch"
    assert (tr.ou.rho, tr.ou.samples) == (0.9, 5)
    assert sum(p.numel() for g in tr.opt.param_groups for p in g["params"]) == 806_144
    assert tr.sched.get_last_lr() == [5e-3]  # cosine decay starts at the base lr
    cfg.method = "vae"
    assert T.build_training(cfg, "cpu").ou is None


@pytest.mark.parametrize("minutes", ["0", "-1", "nan"])
def test_checkpoint_minutes_must_be_positive(minutes, capsys):
    assert main(["train", "binarized-mnist", "--checkpoint-minutes", minutes]) == 2
    assert "--checkpoint-minutes must be a finite number > 0" in capsys.readouterr().err
