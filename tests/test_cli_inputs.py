"""The command line's inputs: train flags generated from the config fields, --print-config / --config,
and every bad input as one line `hvae-fast: error: ...` with exit status 2 and no traceback."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hvae_fast import cli
from hvae_fast.cli import main
from hvae_fast.config import (ModelConfig, OUConfig, RunConfig, TrainConfig, as_flag_value, config_fields, field_choices,
                              flag_of, load_config)
from hvae_fast.errors import HVAEError
from hvae_fast.models.model import build_model

# Flags of `train` that are not config fields: they pick the starting config or steer the command.
COMMAND_FLAGS = {"-h", "--help", "--preset", "--config", "--print-config", "--out", "--resume", "--no-progress",
                 "--data-dir"}
# Flag names from before the flags were generated; scripts use them.
OLD_FLAGS = ["--method", "--rho", "--ou-samples", "--ou-target", "--ou-inference", "--backend", "--ou-recompute",
             "--steps", "--batch-size", "--lr", "--optimizer", "--lr-schedule", "--grad-clip", "--kl-anneal",
             "--free-bits", "--iw-samples-train", "--seed", "--log-every", "--eval-every", "--eval-examples",
             "--checkpoint-every", "--sample-every", "--device", "--preset", "--out", "--resume", "--no-progress",
             "--data-dir"]


def train_parser():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def flag_fields():
    return [(s, f) for s, f in config_fields() if f.metadata.get("flag") is not False]


def test_every_config_field_is_exactly_one_flag():
    actions = [a for a in train_parser()._actions if a.option_strings]
    opts = [o for a in actions for o in a.option_strings]
    assert len(opts) == len(set(opts)), "a flag is declared twice"
    by_dest = {a.dest: a for a in actions}
    for section, f in flag_fields():
        a = by_dest.pop(cli._dest(section, f))
        assert a.option_strings[0] == flag_of(f)
    # What is left are the command's own flags, never a second way to set a field.
    assert {o for a in by_dest.values() for o in a.option_strings} == COMMAND_FLAGS
    assert set(OLD_FLAGS) <= set(opts)
    # Fields that are not flags say why.
    for _, f in config_fields():
        if f.metadata.get("flag") is False:
            assert f.metadata.get("why"), f.name


def test_help_shows_each_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps lines, also at hyphens
    assert "--print-configshowsthevaluesarunwoulduse" in text
    for _, f in flag_fields():
        assert f"default{as_flag_value(f.default)}" in text, f.name


def _other_value(f):
    """A valid value of field ``f`` other than its default, as a command-line string."""
    d, choices = f.default, field_choices()
    if f.name in choices:
        return next(c for c in choices[f.name] if c != d)
    if f.name == "device":
        return "cpu"
    if isinstance(d, bool):
        return None  # the on/off form is chosen by the caller
    if isinstance(d, tuple):
        return as_flag_value((d[0] + 1,) + d[1:])
    if isinstance(d, float):
        return str(d / 2 if d > 0 else 0.5)
    if isinstance(d, str):  # a free name (--wandb PROJECT)
        return d + "x"
    return str(d + 1)


@pytest.mark.parametrize("method", ["hvae", "iwae", "lvae"])
def test_each_flag_sets_its_field(method, capsys):
    argv, want = ["train", "binarized-mnist", "--print-config", "--method", method], []
    for section, f in flag_fields():
        if f.name == "method" or method not in f.metadata.get("methods", (method,)):
            continue
        if f.name in ("rho_schedule", "rho_control", "rho_min"):
            continue  # exclusive with each other and --ou-inference; tests/test_rho_control.py sets each
        if isinstance(f.default, bool):
            argv.append(("--no-" if f.default else "--") + flag_of(f)[2:])
            want.append((section, f, not f.default))
        else:
            v = _other_value(f)
            argv += [flag_of(f), v]
            want.append((section, f, v))
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["method"] == method
    for section, f, v in want:
        g = got[section][f.name] if section else got[f.name]
        d = f.default
        expected = (v if isinstance(d, (bool, str)) else float(v) if isinstance(d, float) else int(v)
                    if isinstance(d, int) else v)
        assert (as_flag_value(tuple(g)) if isinstance(d, tuple) else g) == expected, (section, f.name)


def test_print_config_then_config_file_with_flags_on_top(tmp_path, capsys):
    assert main(["train", "binarized-mnist", "--rho", "0.5", "--kl-anneal", "10,20", "--print-config"]) == 0
    printed = capsys.readouterr().out
    cfg = json.loads(printed)
    assert cfg["ou"]["rho"] == 0.5 and cfg["train"]["kl_anneal"] == [10, 20] and cfg["preset"] == "mnist-mlp-40x4"
    path = tmp_path / "config.json"
    path.write_text(printed)
    assert main(["train", "--config", str(path), "--steps", "7", "--print-config"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == {**cfg, "train": {**cfg["train"], "steps": 7}}
    assert load_config(path).to_dict() == RunConfig.from_dict(cfg).to_dict()


def tiny_config(**train) -> RunConfig:
    t = dict(steps=2, batch_size=16, lr=2e-3, log_every=1, eval_every=2, eval_examples=32, checkpoint_every=2,
             sample_every=2, seed=1)
    t.update(train)
    return RunConfig(dataset="binarized-mnist", preset="tiny", method="hvae",
                     model=ModelConfig(arch="mlp", latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                     ou=OUConfig(rho=0.8, samples=2, backend="torch"), train=TrainConfig(**t), device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run trained from a --config file with --steps on top."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}")
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.json").write_text(tiny_config().to_json())
    assert main(["train", "--config", str(d / "tiny.json"), "--steps", "3", "--out", str(d / "run"),
                 "--data-dir", str(SHARED_DATA), "--no-progress"]) == 0
    return d / "run"


def test_config_file_starts_a_run_with_flags_on_top(tiny_run):
    cfg = load_config(tiny_run / "config.json")
    assert cfg.train.steps == 3 and cfg.model.latent_sizes == (4, 2) and cfg.ou.samples == 2
    last = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 3


def test_tensorboard_events_land_in_the_run(tiny_run):
    pytest.importorskip("tensorboard")
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))


def one_line_error(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("hvae-fast: error: ") and "Traceback" not in err, err
    return err


TRAIN = ["train", "binarized-mnist"]


@pytest.mark.parametrize("argv,needles", [
    (TRAIN + ["--kl-anneal", "inf,5"], ["--kl-anneal", "integers"]),
    (TRAIN + ["--kl-anneal", "1,2,3"], ["--kl-anneal takes 2 values"]),
    (TRAIN + ["--kl-anneal=-1,5"], ["--kl-anneal", ">= 0"]),
    (TRAIN + ["--seed", "1e23"], ["--seed", "2**63"]),
    (TRAIN + ["--seed", "-1"], ["--seed must be", ">= 0"]),
    (TRAIN + ["--free-bits", "nan"], ["--free-bits must be a finite number >= 0"]),
    (TRAIN + ["--free-bits", "inf"], ["--free-bits must be a finite number >= 0"]),
    (TRAIN + ["--grad-clip", "-5"], ["--grad-clip must be a finite number >= 0", "default 200.0"]),
    (TRAIN + ["--grad-clip", "nan"], ["--grad-clip must be a finite number >= 0"]),
    (TRAIN + ["--lr", "0"], ["--lr must be a finite number > 0"]),
    (TRAIN + ["--steps", "ten"], ["--steps", "expected an integer"]),
    (TRAIN + ["--latent-sizes", "8,0", "--hidden-sizes", "8,8"], ["each entry of --latent-sizes", ">= 1"]),
    (TRAIN + ["--latent-sizes", "8,4"], ["--latent-sizes and --hidden-sizes need one entry per stochastic layer"]),
    (TRAIN + ["--backend", "gpu"], ["unknown --backend 'gpu'", "torch"]),
    (TRAIN + ["--activation", "swish"], ["unknown --activation 'swish'", "tanh"]),
    (TRAIN + ["--device", "tpu"], ["unknown --device 'tpu'"]),
    (TRAIN + ["--rho", "1.5"], ["rho must lie in [0, 1]"]),
    (TRAIN + ["--rho", "nan"], ["rho must lie in [0, 1]"]),
    (TRAIN + ["--ou-samples", "0"], ["K must be an integer >= 1"]),
    # Flags of another objective name the flag and the method.
    (TRAIN + ["--method", "vae", "--rho", "0.5"], ["--rho applies to --method hvae/lvae/biva/ladder only", "method is vae"]),
    (TRAIN + ["--method", "vae", "--ou-recompute"], ["--ou-recompute applies to --method hvae/lvae/biva/ladder only"]),
    (TRAIN + ["--method", "iwae", "--ou-samples", "3"], ["--ou-samples applies to --method hvae/lvae/biva/ladder", "iwae"]),
    (TRAIN + ["--method", "lvae", "--ou-inference"], ["--ou-inference applies to --method hvae only", "lvae"]),
    (TRAIN + ["--method", "biva", "--ou-inference"], ["--ou-inference applies to --method hvae only", "biva"]),
    (TRAIN + ["--method", "ladder", "--ou-inference"], ["--ou-inference applies to --method hvae only", "ladder"]),
    (TRAIN + ["--method", "ladder", "--preset", "mnist-mlp-40x4"], ["--method ladder is convolutional", "got mlp"]),
    (TRAIN + ["--method", "ladder", "--latents-per-scale", "1,-1"], ["each entry of --latents-per-scale", ">= 0"]),
    (TRAIN + ["--latents-per-scale", "1,2"], ["--latents-per-scale applies to --method ladder only", "method is hvae"]),
    (TRAIN + ["--iw-samples-train", "5"], ["--iw-samples-train applies to --method iwae only", "method is hvae"]),
    (TRAIN + ["--method", "iwae", "--free-bits", "1"], ["--free-bits applies to --method vae/hvae/lvae/biva/ladder",
                                                        "method is iwae"]),
    (["train", "mnist", "--preset", "mnist-mlp-lvae-5", "--method", "hvae"], ["made for --method lvae, not hvae"]),
    (["train", "mnist", "--preset", "mnist-mlp-lvae-5", "--ou-inference"], ["--ou-inference", "method is lvae"]),
    (TRAIN + ["--preset", "cifar10-resnet-4"], ["is made for cifar10"]),
    (["train", "--steps", "3"], ["train needs a DATASET"]),
    (TRAIN + ["--preset", "mnist-mlp-40x4", "--config", "x.json"], ["--config and --preset"]),
    (TRAIN + ["--config", "/nonexistent/config.json"], ["/nonexistent/config.json does not exist"]),
    (["eval", "run", "--iw-samples", "-3"], ["--iw-samples", ">= 0"]),
    (["eval", "run", "--iw-chunk", "0"], ["--iw-chunk", ">= 1"]),
    (["eval", "run", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["eval", "/nonexistent/run"], ["is not a run directory"]),
    (["sample", "run", "-n", "0"], ["-n", ">= 1"]),
    (["sample", "run", "--output", "/missing/dir/x.png"], ["--output", "/missing/dir does not exist"]),
    (["sample", "run", "--output", "x.jpg"], ["--output", ".png"]),
    (["plot", "run", "--output", "x.foo"], ["--output", "extensions .png, .pdf, .svg"]),
    (["plot", "/nonexistent/run"], ["no metrics.jsonl"]),
    (["memory", "--blocks", "-1"], ["--blocks", ">= 0"]),
    (["memory", "--channels", "0"], ["--channels", ">= 1"]),
    (["memory", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["memory", "--depths", "4,0"], ["--depths", ">= 1"]),
    (["memory", "--rho", "2", "--models", "hvae"], ["rho must lie in [0, 1]"]),
    (["memory", "--json", "/missing/dir/x.json"], ["--json", "/missing/dir does not exist"]),
    (["memory", "--plot", "m.gif"], ["--plot", ".png"]),
])
def test_bad_input_is_one_line_naming_the_problem(argv, needles, capsys):
    err = one_line_error(argv, capsys)
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("text,needle", [
    ("", "is empty"),
    ("{\"method\": \"hvae\", \"ou\": {\"rho\": 0.9", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("{\"ou\": {\"rho\": \"0.5\"}}", "rho must be a number, got '0.5'"),
    ("{\"train\": {\"steps\": true}}", "steps must be an integer, got True"),
    ("{\"train\": {\"kl_anneal\": [1.5, 2]}}", "kl_anneal must be a list of integers"),
    ("{\"model\": [1]}", "\"model\" must be a JSON object"),
    ("{\"train\": {\"stepz\": 3}}", "unknown TrainConfig fields ['stepz']"),
    ("{\"ou\": {\"rho\": 7}}", "rho must lie in [0, 1]"),
    ("\xff\xfe", "cannot read"),
])
def test_bad_config_json_is_one_line(text, needle, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    err = one_line_error(["train", "--config", str(path), "--print-config"], capsys)
    assert needle in err and str(path) in err
    with pytest.raises(HVAEError, match=re.escape(needle)):
        load_config(path)


def test_resume_reads_the_saved_config_through_load_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{\"train\": ")
    err = one_line_error(TRAIN + ["--out", str(tmp_path), "--resume"], capsys)
    assert "is not valid JSON" in err


def test_from_dict_converts_json_forms():
    d = tiny_config().to_dict()
    d["train"]["lr"] = 1  # a JSON integer where a float is expected is fine
    cfg = RunConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.model.latent_sizes == (4, 2) and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with an untrained tiny model: enough for eval / sample to load."""
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(cfg.to_json())
    model = build_model(cfg.method, cfg.model, (1, 28, 28))
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "checkpoint-latest.pt")
    return tmp_path


OOM_CPU = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 858993459200 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("exc", [OOM_CPU, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"),
                                 RuntimeError("Storage size calculation overflowed with sizes=[10**15, 10, 784]")])
def test_out_of_memory_names_the_flag_to_lower(exc, run_dir, monkeypatch, capsys, shared_data):
    import hvae_fast.training.evaluate
    import hvae_fast.experiments.memory
    from hvae_fast.models.model import HierarchicalVAE

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(hvae_fast.training.evaluate, "evaluate", boom)
    monkeypatch.setattr(HierarchicalVAE, "sample", boom)
    monkeypatch.setattr(hvae_fast.experiments.memory, "run_table", boom)
    err = one_line_error(["eval", str(run_dir), "--iw-samples", "100000", "--iw-chunk", "100000",
                          "--data-dir", str(shared_data), "--no-progress"], capsys)
    assert "out of" in err and "memory" in err and "lower --iw-chunk" in err
    assert "lower -n" in one_line_error(["sample", str(run_dir), "-n", "10000000"], capsys)
    assert "lower --batch-size" in one_line_error(["memory", "--batch-size", "100000", "--device", "cpu"], capsys)


def test_other_runtime_errors_keep_their_traceback(run_dir, monkeypatch):
    from hvae_fast.models.model import HierarchicalVAE

    def bug(*a, **k):
        raise RuntimeError("shape mismatch: a bug, not a user error")

    monkeypatch.setattr(HierarchicalVAE, "sample", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", str(run_dir)])


def test_eval_prints_before_writing_and_keeps_a_result_it_cannot_write(run_dir, monkeypatch, capsys, shared_data):
    import os

    def disk_full(fd):  # the data reached no disk: the write's fsync fails, as on a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    argv = ["eval", str(run_dir), "--max-examples", "20", "--batch-size", "10", "--iw-samples", "2",
            "--data-dir", str(shared_data), "--no-progress"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "No space left on device" in err and "printed above as JSON" in err and len(err.strip().splitlines()) == 1
    assert "free disk space" in err and "--out" not in err and "--resume" not in err  # eval has neither flag
    res = json.loads(out[out.index("{"):])
    assert res["num_examples"] == 20 and "iw_bound" in res and "ELBO (nats)" in out
    assert not (run_dir / "eval-valid.json").exists()


def test_outputs_are_checked_before_the_work(run_dir, monkeypatch, capsys):
    import hvae_fast.training.evaluate

    monkeypatch.setattr(hvae_fast.training.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    (run_dir / "eval-valid.json").mkdir()  # a folder where the result file should go
    err = one_line_error(["eval", str(run_dir)], capsys)
    assert "eval-valid.json is a folder" in err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hvae_fast", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("argv", [
    ["train", "binarized-mnist", "--kl-anneal", "inf,5"],
    ["train", "binarized-mnist", "--method", "vae", "--rho", "0.5"],
    ["eval", "somewhere", "--iw-chunk", "0"],
])
def test_bad_input_from_the_shell_is_one_line(argv):
    p = run_cli(*argv)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("hvae-fast: error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_eval_from_the_shell_logs_with_timestamps_and_shows_the_total(run_dir, shared_data):
    p = run_cli("eval", str(run_dir), "--max-examples", "30", "--batch-size", "10", "--iw-samples", "2",
                "--data-dir", str(shared_data))
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO hvae_fast: evaluating .* 3 batches", p.stderr, re.M)
    assert "3/3" in p.stderr  # tqdm over a known total (so it shows an ETA while running)
    assert json.loads((run_dir / "eval-valid.json").read_text())["num_examples"] == 30


def test_optional_fields_take_null_or_their_type():
    from hvae_fast.config import _coerce, _f

    @dataclasses.dataclass
    class C:
        x: float | None = _f(None, "an optional number")

    (f,) = dataclasses.fields(C)
    assert _coerce(f, None, "cfg") is None and _coerce(f, 2, "cfg") == 2.0
    with pytest.raises(HVAEError, match="x must be a number"):
        _coerce(f, "2", "cfg")


def test_every_command_joins_the_cli_through_its_modules_register():
    """One way to add a command (issue 17.3): a module in cli.command_modules() with register(subparsers)."""
    import argparse

    from hvae_fast import cli

    names = []
    for module in cli.command_modules():
        assert not hasattr(module, "add_parser"), module.__name__
        sub = argparse.ArgumentParser().add_subparsers()
        module.register(sub)
        names += list(sub.choices)
    top = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert names == list(top.choices) and len(set(names)) == len(names)
    assert {"train", "eval", "sample", "memory", "sweep", "report", "gradvar", "spectrum", "gpucheck"} <= set(names)
