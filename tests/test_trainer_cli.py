"""End to end: training, checkpoints and exact resume, every CLI command, and each bad input's error."""

import json
import subprocess
import sys

import pytest
import torch

from hvae_fast.cli import main
from hvae_fast.config import ModelConfig, RunConfig, TrainConfig, OUConfig
from hvae_fast.training.trainer import Trainer


def tiny_config(steps=20, method="hvae", **train):
    t = dict(steps=steps, batch_size=32, lr=2e-3, log_every=5, eval_every=10, eval_examples=64,
             checkpoint_every=10, sample_every=steps, seed=3)
    t.update(train)
    return RunConfig(dataset="binarized-mnist", preset="tiny", method=method,
                     model=ModelConfig(arch="mlp", latent_sizes=(8, 4), hidden_sizes=(64, 32)),
                     ou=OUConfig(rho=0.8, samples=3, backend="torch"), train=TrainConfig(**t), device="cpu")


def records(run, split="train"):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["split"] == split]



def train_interrupted(monkeypatch, cfg, out, data_dir, at: int = 13) -> None:
    """Train ``cfg`` into ``out`` and stop it with a KeyboardInterrupt as step ``at`` begins."""
    orig = Trainer.train_step

    def interrupted(self, x):
        if self.step == at:
            raise KeyboardInterrupt
        return orig(self, x)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, out, data_dir=data_dir, progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", orig)

def test_short_training_lowers_the_loss_and_writes_the_run_directory(shared_data, tmp_path):
    tr = Trainer(tiny_config(steps=60), tmp_path / "run", data_dir=shared_data, progress=False)
    tr.fit()
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "checkpoint-latest.pt", "checkpoint-best.pt", "samples-0000060.png"):
        assert (run / f).exists(), f
    rec = records(run)
    # The loss of the tiny model drops from ~540 nats (random init) by far more than batch noise.
    assert rec[-1]["loss"] < rec[0]["loss"] - 50
    assert {"loss", "elbo", "kl_per_layer", "top_kl", "steps_per_s"} <= set(rec[-1])
    assert len(rec[-1]["kl_per_layer"]) == 2
    valid = records(run, "valid")
    assert [v["step"] for v in valid] == [10, 20, 30, 40, 50, 60]
    assert json.loads((run / "config.json").read_text())["ou"]["rho"] == 0.8


def test_resume_after_an_interruption_ends_with_the_same_weights(shared_data, tmp_path, monkeypatch):
    # CPU training is deterministic, so a run interrupted at step 13 (last checkpoint at 10) and
    # resumed must end bit-identical to an uninterrupted one: RNG, data stream, optimizer and
    # schedule all come back from the checkpoint.
    full = Trainer(tiny_config(), tmp_path / "full", data_dir=shared_data, progress=False)
    full.fit()

    train_interrupted(monkeypatch, tiny_config(), tmp_path / "part", shared_data)
    resumed = Trainer(tiny_config(), tmp_path / "part", data_dir=shared_data, resume=True, progress=False)
    assert resumed.step == 10
    resumed.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_non_finite_steps_are_skipped_and_counted(shared_data, tmp_path, monkeypatch):
    import hvae_fast.training.trainer as T

    orig = T.training_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        loss, bound = orig(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), bound) if calls["n"] == 3 else (loss, bound)

    monkeypatch.setattr(T, "training_loss", sometimes_nan)
    tr = Trainer(tiny_config(steps=5), tmp_path / "r", data_dir=shared_data, progress=False)
    tr.fit()
    assert tr.skipped == 1 and tr.step == 5
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())

    monkeypatch.setattr(T, "training_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), torch.zeros(1)))
    tr = Trainer(tiny_config(steps=80), tmp_path / "nan", data_dir=shared_data, progress=False)
    with pytest.raises(T.HVAEError, match="NaN"):
        tr.fit()
    assert (tmp_path / "nan" / "checkpoint-latest.pt").exists()


@pytest.fixture
def trained_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "binarized-mnist", "--steps", "12", "--log-every", "4", "--eval-every", "6",
                 "--eval-examples", "50", "--checkpoint-every", "6", "--sample-every", "12", "--batch-size", "20",
                 "--rho", "0.9", "--ou-samples", "2", "--backend", "torch", "--device", "cpu",
                 "--data-dir", str(shared_data), "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_every_cli_command_runs(trained_run, shared_data, capsys):
    run = trained_run
    assert json.loads((run / "config.json").read_text())["preset"] == "mnist-mlp-40x4"
    assert main(["eval", str(run), "--split", "valid", "--iw-samples", "5", "--max-examples", "40",
                 "--data-dir", str(shared_data), "--no-progress"]) == 0
    res = json.loads((run / "eval-valid.json").read_text())
    for key in ("elbo", "iw_bound", "iw_samples", "recon", "kl_total", "kl_per_layer", "active_units", "split", "num_examples"):
        assert key in res, key
    assert res["split"] == "valid" and res["num_examples"] == 40 and len(res["kl_per_layer"]) == 4
    assert res["iw_bound"] >= res["elbo"] - 1.0
    assert main(["sample", str(run), "-n", "4", "--output", str(run / "s.png")]) == 0
    assert (run / "s.png").stat().st_size > 0
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-resnet-4" in out and "12.4" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["cpu"]["torch"]["available"] is True
    assert main(["info"]) == 0
    assert "OU backends on cpu" in capsys.readouterr().out
    assert main(["build"]) == 0
    assert "cpp   built" in capsys.readouterr().out
    assert main(["plot", str(run), "--output", str(run / "curves.png")]) == 0
    assert (run / "curves.png").stat().st_size > 0
    assert main(["plot", str(run.parent / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def run_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "hvae_fast", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["train", "binarized-mnist", "--rho", "1.5"], "rho must lie in [0, 1]"),
    (["train", "binarized-mnist", "--rho", "-0.1"], "rho must lie in [0, 1]"),
    (["train", "binarized-mnist", "--ou-samples", "0"], "K must be an integer >= 1"),
    (["train", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "binarized-mnist", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "binarized-mnist", "--preset", "cifar10-resnet-4"], "is made for cifar10"),
    (["eval", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_gives_one_clear_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_input_from_the_shell_has_no_traceback():
    p = run_cli("train", "binarized-mnist", "--rho", "2")
    assert p.returncode == 2
    assert p.stderr.startswith("hvae-fast: error: rho must lie in [0, 1]") and "Traceback" not in p.stderr


def test_missing_data_offline_names_the_file_and_the_fix(tmp_path, offline, capsys):
    code = main(["train", "binarized-mnist", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "binarized_mnist_train.amat" in err and "--data-dir" in err


def test_unwritable_output_directory(tmp_path, shared_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "binarized-mnist", "--out", str(blocker / "run"), "--steps", "1",
                 "--data-dir", str(shared_data), "--no-progress"])
    assert code == 2 and "cannot write to the output directory" in capsys.readouterr().err


def test_resume_checks_the_config_and_refuses_to_overwrite(trained_run, shared_data, capsys):
    base = ["train", "binarized-mnist", "--out", str(trained_run), "--data-dir", str(shared_data), "--no-progress"]
    assert main(base + ["--steps", "12"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(base + ["--resume", "--rho", "0.5"]) == 2
    assert "differs from the checkpoint's in ou.rho" in capsys.readouterr().err
    assert main(["train", "mnist"] + base[2:] + ["--resume"]) == 2
    assert "is a binarized-mnist run, not mnist" in capsys.readouterr().err
    # Extending a run is a valid resume.
    assert main(base + ["--resume", "--steps", "14"]) == 0
    last = [json.loads(l) for l in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 14
