"""One owner per run directory: the train lock, folders that are not (or no longer) resumable runs,
stale temporary files, and config.json written only once a run is set up."""

import fcntl
import os
import re
import signal
import subprocess
import sys

import pytest

import hvae_fast.training.rundir as R
from hvae_fast.cli import main
from hvae_fast.training.rundir import LOCK_NAME, load_checkpoint

from test_checkpoints import cli_train


def listing(d):
    return sorted((p.name, p.read_bytes()) for p in d.iterdir() if p.is_file())


def test_a_second_trainer_is_refused_while_the_lock_is_held(tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}\n")
        f.flush()
        assert main(cli_train(out, shared_data)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by another `hvae-fast train` (process {os.getpid()})" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    # The holder is gone (its file closed): the folder trains.
    assert main(cli_train(out, shared_data, steps=2)) == 0


def test_a_running_trainer_owns_its_folder_and_sigterm_checkpoints_it(tmp_path, shared_data):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "hvae_fast", *cli_train(out, shared_data, steps=100_000)],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in first.stderr:
            if re.search(r"step \d+/100000", line):
                break
        second = subprocess.run([sys.executable, "-m", "hvae_fast", *cli_train(out, shared_data, "--resume")],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"(process {first.pid})" in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, err
    m = re.search(r"stopped by SIGTERM after step (\d+)", err)
    assert m and load_checkpoint(out / "checkpoint-latest.pt", "cpu")["step"] == int(m.group(1))


@pytest.mark.parametrize("left", [["config.json"], ["metrics.jsonl"], ["config.json", "checkpoint-best.pt"]])
@pytest.mark.parametrize("resume", [False, True])
def test_an_attempt_that_died_before_its_first_checkpoint_is_not_reused(tmp_path, shared_data, capsys, left, resume):
    out = tmp_path / "run"
    out.mkdir()
    for name in left:
        (out / name).write_text("{}\n")
    before = listing(out)
    assert main(cli_train(out, shared_data, *(["--resume"] if resume else []))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "stopped before its first checkpoint" in err and f"rm -r {out}" in err
    assert [x for x in listing(out) if x[0] != LOCK_NAME] == before


def test_a_folder_that_is_not_a_run_is_left_untouched(tmp_path, shared_data, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(cli_train(out, shared_data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a run directory and not empty (it holds notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_failed_data_load_leaves_no_config_and_the_folder_usable(tmp_path, shared_data, offline, capsys):
    out = tmp_path / "run"
    assert main(cli_train(out, tmp_path / "empty")) == 2
    assert "binarized_mnist_train.amat" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    offline.undo()
    assert main(cli_train(out, shared_data, steps=2)) == 0
    assert (out / "config.json").exists() and (out / "checkpoint-latest.pt").exists()


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, shared_data):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".checkpoint-latest.pt.tmp-999999", ".config.json.tmp-999999"]
    for name in stale:
        (out / name).write_bytes(b"half")
    assert main(cli_train(out, shared_data, steps=2)) == 0  # temp files alone do not make a folder foreign
    assert not any(R._is_temp(p.name) for p in out.iterdir())
    (out / stale[0]).write_bytes(b"half")
    assert main(cli_train(out, shared_data, "--resume", steps=3)) == 0
    assert not (out / stale[0]).exists()
