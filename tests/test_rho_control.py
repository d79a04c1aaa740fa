"""A rho that changes during training: schedules by hand, their parse errors, the controller on
synthetic plants, and the trainer passing, logging and checkpointing the current rho."""

import json
import math
import random

import pytest
import torch

import hvae_fast.training.trainer as T
from hvae_fast.cli import main
from hvae_fast.config import OUConfig, RunConfig
from hvae_fast.errors import HVAEError
from hvae_fast.training.rho_control import KI, KP, RhoController, parse_schedule
from hvae_fast.training.rundir import load_checkpoint
from hvae_fast.training.trainer import Trainer

from test_trainer_cli import records, tiny_config, train_interrupted


# -- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, rho, want", [
    ("constant", 0.7, {0: 0.7, 10**6: 0.7}),
    ("linear:0.5:1.0:100", 0.9, {0: 0.5, 1: 0.505, 50: 0.75, 99: 0.995, 100: 1.0, 5000: 1.0}),
    ("linear:1:0.5:10", 0.9, {0: 1.0, 5: 0.75, 10: 0.5, 11: 0.5}),
    # cosine: START + (END - START) (1 - cos(pi t / STEPS)) / 2
    ("cosine:0.2:1.0:100", 0.9, {0: 0.2, 25: 0.2 + 0.8 * (1 - 2**-0.5) / 2, 50: 0.6, 75: 0.2 + 0.8 * (1 + 2**-0.5) / 2,
                                 100: 1.0, 101: 1.0}),
    ("linear:0.5:1.0:100:hold=20", 0.9, {0: 0.5, 19: 0.5, 20: 0.5, 70: 0.75, 120: 1.0, 121: 1.0}),
    ("cosine:0.5:1.0:10:hold=3", 0.9, {2: 0.5, 3: 0.5, 8: 0.75, 13: 1.0}),
])
def test_schedule_values_at_known_steps(spec, rho, want):
    s = parse_schedule(spec, rho)
    for step, v in want.items():
        assert s(step) == pytest.approx(v, abs=1e-12), (spec, step)


@pytest.mark.parametrize("spec, needle", [
    ("", "unknown kind ''"), ("exp:0.5:1:10", "unknown kind 'exp'"), ("constant:0.5", "constant takes no values"),
    ("linear:0.5:1", "takes START:END:STEPS"), ("linear:0.5:1:10:hold=5:x", "takes START:END:STEPS"),
    ("linear:a:1:10", "START must be a number"), ("linear:0.5:1.5:10", "END must lie in [0, 1]"),
    ("linear:nan:1:10", "START must lie in [0, 1]"), ("cosine:-0.1:1:10", "START must lie in [0, 1]"),
    ("linear:0.5:1:0", "STEPS must be at least 1"), ("linear:0.5:1:-5", "STEPS must be a whole number"),
    ("linear:0.5:1:1e3", "STEPS must be a whole number"), ("linear:0.5:1:10:hold=x", "hold must be a whole number"),
    ("linear:0.5:1:10:hold=²", "hold must be a whole number"), ("linear:0.5:1:10:wait=5", "must be hold=STEPS"),
])
def test_schedule_parse_errors_are_one_line_with_the_syntax(spec, needle):
    with pytest.raises(HVAEError) as e:
        parse_schedule(spec, 0.9)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "linear:START:END:STEPS" in msg and msg.startswith("--rho-schedule")


def test_the_rho_flags_set_their_fields_and_bad_ones_are_one_line(capsys):
    base = ["train", "binarized-mnist", "--print-config"]
    assert main(base + ["--rho-schedule", "cosine:0.5:1:100:hold=7"]) == 0
    assert json.loads(capsys.readouterr().out)["ou"]["rho_schedule"] == "cosine:0.5:1:100:hold=7"
    assert main(base + ["--rho-control", "3.5", "--rho-min", "0.6"]) == 0
    ou = json.loads(capsys.readouterr().out)["ou"]
    assert (ou["rho_control"], ou["rho_min"], ou["rho_schedule"]) == (3.5, 0.6, "constant")
    for extra, needle in [(["--rho-schedule", "linear:0.5"], "--rho-schedule 'linear:0.5'"),
                          (["--rho-schedule", "linear:0.5:1:9", "--rho-control", "2"], "both set rho"),
                          (["--method", "vae", "--rho-schedule", "linear:0.5:1:9"], "--rho-schedule applies to --method hvae"),
                          (["--method", "iwae", "--rho-control", "2"], "--rho-control applies to --method hvae"),
                          (["--rho-control", "-1"], "--rho-control must be a finite number >= 0"),
                          (["--rho-min", "0.6"], "--rho-min bounds --rho-control only"),
                          (["--rho-control", "2", "--rho", "0.4"], "below --rho-min 0.5"),
                          (["--rho-control", "2", "--ou-inference"], "which --ou-inference smooths")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("hvae-fast: error: ") and err.count("\n") == 1 and needle in err, (extra, err)


def test_a_config_file_gets_the_same_rules():
    # A config.json never passes through the flags' method check: validate() names both flags itself.
    cfg = RunConfig(method="vae", ou=OUConfig(rho_control=2.0))
    with pytest.raises(HVAEError, match=r"--rho-schedule and --rho-control steer .* --method vae has none"):
        cfg.validate()
    RunConfig(method="vae").validate()  # the defaults are fine for every method


# -- the controller ---------------------------------------------------------------------------

def plant(c=20.0, rho_c=0.8):
    """Top-layer KL as a function of rho: collapses linearly to 0 at rho_c (the phase transition)."""
    return lambda rho: max(0.0, c * (rho_c - rho))


def run_plant(ctl, f, steps, noise=0.0, lag=1.0, seed=0):
    """Closed loop: the KL follows f(rho) with time constant ``lag`` steps, observed with Gaussian noise."""
    rng = random.Random(seed)
    kl, rhos = f(ctl.rho), []
    for _ in range(steps):
        kl += (f(ctl.rho) - kl) / lag
        ctl.observe(kl + rng.gauss(0.0, noise))
        rhos.append(ctl.rho)
    return rhos


@pytest.mark.parametrize("rho0, lag", [(0.9, 1.0), (0.5, 1.0), (0.95, 300.0)])
def test_controller_settles_where_the_plant_meets_the_target(rho0, lag):
    # KL = 20 (0.8 - rho) meets a 2-nat target at rho = 0.7: the largest rho that keeps it.
    ctl = RhoController(target=2.0, rho_min=0.5, integral=rho0)
    rhos = run_plant(ctl, plant(), 30_000, noise=1.0, lag=lag)
    tail = rhos[-5000:]
    assert abs(sum(tail) / len(tail) - 0.7) < 0.005 and max(abs(r - 0.7) for r in tail) < 0.02
    assert abs(ctl.kl_ema - 2.0) < 0.3


def test_controller_raises_rho_while_the_kl_is_above_target_and_lowers_it_below():
    ctl = RhoController(target=2.0, rho_min=0.5, integral=0.6)
    ctl.observe(6.0)  # relative error (6 - 2) / 2 clipped to 1
    assert ctl.integral == pytest.approx(0.6 + KI) and ctl.rho == pytest.approx(0.6 + KI + KP)
    ctl = RhoController(target=2.0, rho_min=0.5, integral=0.6)
    ctl.observe(1.0)  # error -0.5
    assert ctl.integral == pytest.approx(0.6 - KI / 2) and ctl.rho == pytest.approx(0.6 - KI / 2 - KP / 2)
    assert RhoController(target=2.0, rho_min=0.5, integral=0.6).observe(2.0) == 0.6  # on target: stays


def test_controller_reaches_one_when_the_target_holds_and_does_not_wind_up():
    ctl = RhoController(target=1.0, rho_min=0.5, integral=0.9)
    rhos = run_plant(ctl, lambda rho: 5.0, 2000)  # the layer stays active even unsmoothed
    assert rhos[-1] == 1.0 and ctl.integral == 1.0 and all(b >= a for a, b in zip(rhos, rhos[1:]))
    run_plant(ctl, lambda rho: 0.0, 20_000)  # collapsed, whatever rho does: held at rho_min ...
    assert ctl.rho == ctl.integral == 0.5
    ctl.observe(300.0)  # moving average 3 nats: with no wound-up integral, one step above target raises rho
    assert ctl.rho > 0.5 and ctl.integral > 0.5


def test_controller_ignores_a_non_finite_kl_and_checks_its_arguments():
    ctl = RhoController(target=2.0, rho_min=0.5, integral=0.8)
    ctl.observe(3.0)
    before = ctl.state_dict()
    for bad in (math.nan, math.inf):
        ctl.observe(bad)
    assert ctl.state_dict() == before
    with pytest.raises(HVAEError, match="rho_min <= rho"):
        RhoController(target=2.0, rho_min=0.5, integral=0.4)
    with pytest.raises(HVAEError, match="lacks one of integral, rho, kl_ema"):
        ctl.load_state_dict({"rho": 0.7})


def test_controller_state_round_trips_exactly():
    a = RhoController(target=2.0, rho_min=0.5, integral=0.9)
    run_plant(a, plant(), 777, noise=1.0, seed=1)
    b = RhoController(target=2.0, rho_min=0.5, integral=0.9)
    b.load_state_dict(a.state_dict())
    assert run_plant(a, plant(), 500, noise=1.0, seed=2) == run_plant(b, plant(), 500, noise=1.0, seed=2)


# -- in the trainer ---------------------------------------------------------------------------

def test_training_passes_and_logs_the_scheduled_rho(shared_data, tmp_path, monkeypatch):
    seen = []
    orig = T.training_loss

    def spy(model, x, method, ou, *a):
        seen.append(ou.rho)
        return orig(model, x, method, ou, *a)

    monkeypatch.setattr(T, "training_loss", spy)
    cfg = tiny_config(steps=8, log_every=1, eval_every=100, checkpoint_every=100)
    cfg.ou.rho_schedule = "linear:0.5:1.0:4:hold=2"
    Trainer(cfg, tmp_path / "run", data_dir=shared_data, progress=False).fit()
    want = [0.5, 0.5, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0]  # step indices 0..7
    assert seen == want
    assert [(r["step"], r["rho"]) for r in records(tmp_path / "run")] == list(zip(range(1, 9), want))


def test_controlled_run_resumes_bit_identical(shared_data, tmp_path, monkeypatch):
    # Interrupted at step 13, resumed from the step-10 checkpoint: the weights and every logged rho
    # match an uninterrupted run only if the controller's state came back from the checkpoint.
    def cfg():
        c = tiny_config(log_every=1)
        c.ou.rho_control, c.ou.rho_min = 40.0, 0.3
        return c

    full = Trainer(cfg(), tmp_path / "full", data_dir=shared_data, progress=False)
    full.fit()
    rho_full = [r["rho"] for r in records(tmp_path / "full")]
    assert len(rho_full) == 20 and len(set(rho_full)) > 10 and all(0.3 <= r <= 1.0 for r in rho_full)
    assert rho_full[0] == 0.8  # --rho is the first step's rho

    train_interrupted(monkeypatch, cfg(), tmp_path / "part", shared_data)
    st = load_checkpoint(tmp_path / "part" / "checkpoint-latest.pt", "cpu")
    assert st["step"] == 10 and set(st["rho_control"]) == {"integral", "rho", "kl_ema"}
    resumed = Trainer(cfg(), tmp_path / "part", data_dir=shared_data, resume=True, progress=False)
    assert resumed.controller.state_dict() == st["rho_control"]
    resumed.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert resumed.controller.state_dict() == full.controller.state_dict()
    resumed_rho = {r["step"]: r["rho"] for r in records(tmp_path / "part")}  # steps 11..13 logged twice: last wins
    assert [resumed_rho[s] for s in range(1, 21)] == rho_full


@pytest.mark.parametrize("flag", [["--rho-schedule", "linear:0.5:1.0:100"], ["--rho-control", "2"]])
def test_a_changing_rho_is_refused_with_compile(flag, capsys):
    from hvae_fast.cli import main

    assert main(["train", "binarized-mnist", "--compile", *flag, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile" in err and "constant rho" in err
