"""The run folder against a hostile or careless user: planted symbolic links are never written
through, tampered checkpoints are refused with one line, a full disk gives the one-line "free disk
space" error, a resume leaves metrics.jsonl as an uninterrupted run's, and a Ctrl-C during
validation checkpoints the run (issue 18, items 3, 7, 9, 12, 14)."""

import errno
import io
import json
import logging
import os
import signal

import pytest
import torch

import hvae_fast.training.rundir as R
import hvae_fast.training.trainer as T
from hvae_fast.cli import main
from hvae_fast.errors import HVAEError
from hvae_fast.training.trainer import Trainer

from test_checkpoints import cli_train, copy_run, tiny_run  # noqa: F401 (a fixture)
from test_trainer_cli import tiny_config, train_interrupted

SECRET = b"a file outside the run folder\n"


def outside(tmp_path):
    """A file outside any run folder that a planted link points at."""
    target = tmp_path / "precious.txt"
    target.write_bytes(SECRET)
    return target


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- item 3: no write follows a planted link ---------------------------------------------------------

def test_a_planted_lock_link_is_refused_and_its_target_kept(tmp_path, shared_data, capsys):
    target, out = outside(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / R.LOCK_NAME).symlink_to(target)
    assert main(cli_train(out, shared_data)) == 2
    assert "is a symbolic link" in one_line_error(capsys)
    assert target.read_bytes() == SECRET and sorted(p.name for p in out.iterdir()) == [R.LOCK_NAME]


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "checkpoint-best.pt", "samples-0000004.png"])
def test_a_symlinked_run_file_is_refused_on_resume(tiny_run, tmp_path, shared_data, capsys, name):
    target, run = outside(tmp_path), copy_run(tiny_run, tmp_path / "run")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    with pytest.raises(HVAEError, match="is a symbolic link"):
        Trainer(tiny_config(steps=6, log_every=2, eval_every=2), run, data_dir=shared_data, resume=True,
                progress=False)
    assert target.read_bytes() == SECRET


def test_metrics_are_never_appended_through_a_link(tmp_path):
    target = outside(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(HVAEError, match="is a symbolic link"):
        R.append_metrics(tmp_path, {"split": "train", "step": 1})
    assert target.read_bytes() == SECRET


def test_a_planted_temp_name_is_not_written_through(tmp_path):
    """The old writer's temporary names were predictable (.NAME.tmp-PID, .samples-...tmp.png)."""
    target = outside(tmp_path)
    for name in (f".checkpoint-latest.pt.tmp-{os.getpid()}", ".samples-0000004.tmp.png"):
        (tmp_path / name).symlink_to(target)
    R.atomic_save({"step": 1}, tmp_path / "checkpoint-latest.pt")
    R.save_image_grid(torch.rand(4, 1, 28, 28), tmp_path / "samples-0000004.png")
    assert target.read_bytes() == SECRET
    assert torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True) == {"step": 1}


def test_sample_does_not_follow_a_planted_temp_or_output_link(tiny_run, tmp_path, capsys):
    target, run = outside(tmp_path), copy_run(tiny_run, tmp_path / "run")
    (run / ".samples-eval-0000004.tmp.png").symlink_to(target)
    assert main(["sample", str(run), "--device", "cpu", "-n", "4"]) == 0
    assert target.read_bytes() == SECRET and (run / "samples-eval-0000004.png").stat().st_size > 0
    (run / "samples-eval-0000004.png").unlink()
    (run / "samples-eval-0000004.png").symlink_to(target)
    capsys.readouterr()
    assert main(["sample", str(run), "--device", "cpu", "-n", "4"]) == 2
    assert "is a symbolic link" in one_line_error(capsys) and target.read_bytes() == SECRET


def test_temp_names_are_unique_and_a_failed_write_removes_its_temp(tmp_path):
    seen = []

    def write(f):
        seen.append(os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")))
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    for _ in range(2):
        with pytest.raises(R.WriteFailed, match="Input/output error"):
            R.atomic_write(tmp_path / "config.json", write)
    assert len(set(seen)) == 2 and all(R._is_temp(n) for n in seen)
    assert list(tmp_path.iterdir()) == []


# -- item 7: checkpoints with wrongly typed fields -----------------------------------------------------

TAMPERED = [("step", "7"), ("step", torch.tensor(7)), ("step", 1e30), ("step", -5), ("best_valid", "high"),
            ("world_size", "two"), ("rng_cpu", torch.zeros(10, dtype=torch.uint8)), ("model", [1, 2]),
            ("skipped", None)]


@pytest.mark.parametrize("key,value", TAMPERED, ids=[f"{k}={v!r}"[:30] for k, v in TAMPERED])
def test_a_checkpoint_field_of_the_wrong_type_is_refused(tiny_run, tmp_path, shared_data, key, value):
    run = copy_run(tiny_run, tmp_path / "run")
    st = torch.load(run / "checkpoint-latest.pt", weights_only=True)
    st[key] = value
    torch.save(st, run / "checkpoint-latest.pt")
    with pytest.raises(HVAEError, match=f"'{key}' is ") as e:
        Trainer(tiny_config(steps=6, log_every=2, eval_every=2), run, data_dir=shared_data, resume=True,
                progress=False)
    assert "\n" not in str(e.value)


def test_eval_refuses_nan_weights(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    for name in ("checkpoint-best.pt", "checkpoint-latest.pt"):
        st = torch.load(run / name, weights_only=True)
        key = next(k for k, v in st["model"].items() if v.is_floating_point())
        st["model"][key][..., 0] = float("nan")
        torch.save(st, run / name)
    assert main(["eval", str(run), "--device", "cpu", "--iw-samples", "0", "--max-examples", "10"]) == 2
    assert "NaN/inf weights" in one_line_error(capsys) and not (run / "eval-valid.json").exists()


# -- item 9: a full disk ---------------------------------------------------------------------------------

class FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC after the first ``room`` bytes."""

    def __init__(self, f, room=64):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, shared_data, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(cli_train(out, shared_data, steps=2)) == 0
    before = (out / "checkpoint-latest.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FullDisk(f), *a, **k))
    capsys.readouterr()
    assert main(cli_train(out, shared_data, "--resume", steps=4)) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "free disk space" in err and "--resume" in err
    assert (out / "checkpoint-latest.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MiB file system (tmpfs: room for a run of the 9 MB mnist-mlp-40x4 checkpoints), where this machine lets the test mount one (root with
    CAP_SYS_ADMIN); skipped elsewhere. Unmounted afterwards."""
    import shutil
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("this machine does not let the test mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_keeps_the_last_checkpoint_and_resumes(small_disk, shared_data, capsys):
    out = small_disk / "run"
    assert main(cli_train(out, shared_data, steps=2)) == 0
    before = (out / "checkpoint-latest.pt").read_bytes()
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the file system to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    capsys.readouterr()
    assert main(cli_train(out, shared_data, "--resume", steps=4)) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "free disk space" in err, err
    assert (out / "checkpoint-latest.pt").read_bytes() == before  # the last good checkpoint, whole
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no temporary file left taking space
    filler.unlink()  # space freed: the same command resumes and finishes
    assert main(cli_train(out, shared_data, "--resume", steps=4)) == 0
    assert torch.load(out / "checkpoint-latest.pt", weights_only=True)["step"] == 4


# -- item 12: resume leaves metrics.jsonl as an uninterrupted run's ---------------------------------------

def _records(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("steps_per_s", None)  # a timing
    return recs


def test_metrics_after_a_kill_and_resume_equal_an_uninterrupted_run(tmp_path, shared_data, monkeypatch):
    cfg = lambda: tiny_config(steps=12, log_every=2, eval_every=6, checkpoint_every=4, sample_every=100)  # noqa: E731
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    Trainer(cfg(), whole, data_dir=shared_data, progress=False).fit()
    train_interrupted(monkeypatch, cfg(), cut, shared_data, at=7)  # dies in step 8: records to 6, checkpoint at 4
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a line cut short by the kill
    assert max(r["step"] for r in _records_loose(cut)) == 6
    assert torch.load(cut / "checkpoint-latest.pt", weights_only=True)["step"] == 4
    Trainer(cfg(), cut, data_dir=shared_data, resume=True, progress=False).fit()
    assert _records(cut) == _records(whole)


def _records_loose(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_resume_with_fewer_steps_than_done_is_refused(tiny_run, tmp_path, shared_data):
    run = copy_run(tiny_run, tmp_path / "run")
    config = (run / "config.json").read_bytes()
    with pytest.raises(HVAEError, match=r"is at step 4, past --steps 2: pass --steps 4 or more"):
        Trainer(tiny_config(steps=2, log_every=2, eval_every=2), run, data_dir=shared_data, resume=True,
                progress=False)
    assert (run / "config.json").read_bytes() == config


# -- item 14: validation inside train ------------------------------------------------------------------

def test_validation_shows_progress_or_a_status_line(tmp_path, shared_data, monkeypatch, caplog):
    seen = []
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: seen.append(k) or real(*a, **k))
    Trainer(tiny_config(steps=2, log_every=2, eval_every=2), tmp_path / "bar", data_dir=shared_data).fit()
    assert seen[-1]["progress"] is True and seen[-1]["num_batches"] == 2  # 64 examples, batches of 32
    with caplog.at_level(logging.INFO, logger="hvae_fast.training.trainer"):
        Trainer(tiny_config(steps=2, log_every=2, eval_every=2), tmp_path / "lines", data_dir=shared_data,
                progress=False).fit()
    assert seen[-1]["progress"] is False
    assert "validating step 2 on 64 examples" in caplog.text and "validation at step 2: ELBO" in caplog.text


def test_ctrl_c_during_validation_checkpoints_and_prints_the_resume_command(tmp_path, shared_data, monkeypatch,
                                                                             capsys):
    from test_checkpoints import cli_train as argv_of

    real = T.evaluate
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler stops the pass at once
            pytest.fail("validation went on after Ctrl-C")
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate", interrupted)
    out = tmp_path / "run"
    argv = argv_of(out, shared_data, "--eval-every", "2", steps=4)
    assert main(argv) == 130
    err = capsys.readouterr().err
    resume = f"hvae-fast train binarized-mnist --out {out} --resume --data-dir {shared_data}"
    assert "stopped by SIGINT after step 2 (during its validation" in err and f"resume with `{resume}`" in err
    assert torch.load(out / "checkpoint-latest.pt", weights_only=True)["step"] == 2
    assert [r["split"] for r in _records(out)] == ["train"]
    assert main(argv + ["--resume"]) == 0  # the validation of step 2 runs first
    assert [(r["split"], r["step"]) for r in _records(out)] == [("train", 2), ("valid", 2), ("train", 4),
                                                                   ("valid", 4)]


def test_a_second_ctrl_c_still_prints_the_exact_resume_command(tmp_path, shared_data, monkeypatch, capsys):
    orig = Trainer.train_step

    def second_ctrl_c(self, x):  # the handler's KeyboardInterrupt, as a second Ctrl-C raises it
        if self.step == 3:
            raise KeyboardInterrupt
        return orig(self, x)

    monkeypatch.setattr(Trainer, "train_step", second_ctrl_c)
    out = tmp_path / "run"
    assert main(cli_train(out, shared_data, steps=6)) == 130
    err = capsys.readouterr().err
    resume = f"hvae-fast train binarized-mnist --out {out} --resume --data-dir {shared_data}"
    assert f"interrupted; checkpoint-latest.pt holds step 2: resume with `{resume}`" in err
