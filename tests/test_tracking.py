"""Experiment trackers (hvae_fast/training/tracking.py): TensorBoard's hparams, sample grids and a
resume without repeated steps; W&B in offline mode (records, sample grids, config, group, the same
run on resume); a missing wandb refused at start; a sweep passing its name as the W&B group."""

import json
import struct
import sys

import pytest

from hvae_fast.cli import main
from hvae_fast.training import tracking
from hvae_fast.training.trainer import Trainer
from test_trainer_cli import tiny_config, train_interrupted


def interrupted_then_resumed(monkeypatch, cfg, run, data_dir) -> Trainer:
    """Train ``cfg`` into ``run``, stopped as step 17 begins (checkpoint at 10, step 15 logged), then
    resumed to the end (logging step 15 again)."""
    train_interrupted(monkeypatch, cfg, run, data_dir, at=17)
    tr = Trainer(cfg, run, data_dir=data_dir, resume=True, progress=False)
    assert tr.step == 10
    tr.fit()
    return tr


# -- TensorBoard -------------------------------------------------------------------------------------

def test_tensorboard_gets_hparams_sample_grids_and_a_resume_without_repeats(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    interrupted_then_resumed(monkeypatch, tiny_config(steps=20, sample_every=10), run, shared_data)
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    # Step 15 was logged past the first attempt's checkpoint (10) and again after the resume:
    # TensorBoard keeps the second copy only, as metrics.jsonl does.
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in ea.Scalars("valid/elbo")] == [10, 20]
    best = [e.value for e in ea.Scalars("valid/best_elbo")]
    assert best == [max(best[:i + 1]) for i in range(len(best))]
    assert len(ea.Scalars("train/kl_per_layer/2")) == 4
    # The sample grid of each sample step: 64 images of 28x28 in 8 rows, with 2-pixel borders.
    imgs = ea.Images("samples")
    assert [i.step for i in imgs] == [10, 20] and (imgs[0].width, imgs[0].height) == (8 * 30 + 2, 8 * 30 + 2)
    content = ea.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    exp = data["_hparams_/experiment"].experiment
    assert [m.name.tag for m in exp.metric_infos] == list(tracking.HPARAM_METRICS)
    hp = data["_hparams_/session_start_info"].session_start_info.hparams
    assert hp["train.lr"].number_value == 2e-3 and hp["model.latent_sizes"].string_value == "8,4"
    assert hp["method"].string_value == "hvae" and hp["train.compile"].bool_value is False
    assert {h.name for h in exp.hparam_infos} == set(hp) == set(tracking.flat_config(tiny_config()))
    assert data["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS: the run finished


# -- Weights & Biases (offline) -----------------------------------------------------------------------

@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B offline and quiet, its per-user folders in tmp_path (the run's own files go to RUN_DIR/wandb)."""
    pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                       ("WANDB_CONFIG_DIR", tmp_path / "wb"), ("WANDB_CACHE_DIR", tmp_path / "wb"),
                       ("WANDB_DATA_DIR", tmp_path / "wb")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return monkeypatch


def wandb_records(path):
    """The protobuf Records of an offline run's .wandb file: W&B's LevelDB-style log, a 7-byte
    header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last) and its payload."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:8]
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def offline_run(path) -> dict:
    """{"run": its RunRecord, "config": {key: value}, "history": [{key: value}]} of a .wandb file."""
    run, config, history, kinds = None, {}, [], set()
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "run":
            run = r.run
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert "exit" in kinds, (path, kinds)  # the whole run, to its end
    return {"run": run, "config": config, "history": history}


def test_wandb_offline_logs_records_samples_and_config_and_resume_continues_the_run(shared_data, tmp_path,
                                                                                    wandb_offline):
    run = tmp_path / "run"
    cfg = tiny_config(steps=20, sample_every=10, wandb="hvae-test", wandb_group="grid-1")
    interrupted_then_resumed(wandb_offline, cfg, run, shared_data)
    # run.finish() returns before W&B's service has written all of the run's file; its teardown
    # waits for it (a `train` process does the same at exit).
    sys.modules["wandb"].teardown()
    state = json.loads((run / tracking.WANDB_STATE).read_text())
    assert state["project"] == "hvae-test"
    # Two attempts, two offline folders of the same W&B run (`wandb sync` joins them).
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{state['id']}.wandb" for f in files)
    first, resumed = (offline_run(f) for f in files)
    for r in (first, resumed):
        assert (r["run"].run_id, r["run"].project, r["run"].run_group, r["run"].display_name) == (
            state["id"], "hvae-test", "grid-1", "run")
        assert r["config"]["train"]["wandb"] == "hvae-test" and r["config"]["model"]["latent_sizes"] == [8, 4]
    def steps(key, *runs):
        return [h["_step"] for r in runs for h in r["history"] if key in h]

    # Offline, W&B knows no step of the earlier attempt: the resumed one logs again from the checkpoint
    # (online, W&B holds step 15 already and the tracker skips it).
    assert steps("train/loss", first) == [5, 10, 15] and steps("train/loss", resumed) == [15, 20]
    assert steps("train/kl_per_layer/2", first, resumed) == [5, 10, 15, 15, 20]
    assert steps("valid/elbo", first, resumed) == steps("valid/best_elbo", first, resumed) == [10, 20]
    assert steps("samples/_type", first, resumed) == [10, 20]
    rows = first["history"] + resumed["history"]
    assert sorted(p.name.split("_")[1] for p in (run / "wandb").glob("offline-run-*/files/media/images/*.png")) == [
        "10", "20"]
    # metrics.jsonl's numbers are W&B's
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "valid" and next(h for h in rows if "valid/elbo" in h and h["_step"] == 20)[
        "valid/elbo"] == pytest.approx(last["elbo"])


def test_wandb_missing_is_one_clear_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    code = main(["train", "binarized-mnist", "--steps", "2", "--wandb", "proj", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "wandb is not installed" in err and "pip install 'hvae-fast[wandb]'" in err
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [(["--wandb-group", "g"], "pass --wandb PROJECT too"),
                                           (["--wandb", "a/b"], "is not a W&B project name (it holds /)")])
def test_wandb_flags_are_checked_before_a_run_starts(flags, needle, capsys):
    assert main(["train", "binarized-mnist", *flags, "--print-config"]) == 2
    assert needle in capsys.readouterr().err


# -- sweeps -------------------------------------------------------------------------------------------

def test_a_sweep_groups_its_points_under_its_name(tmp_path):
    from hvae_fast.experiments import sweep

    def train_cmd(*base):
        spec = sweep.make_spec(["train", "binarized-mnist", *base], [sweep.parse_axis("grid", "seed=0,1")])
        return sweep.Point(tmp_path / "grid-1", {"seed": "0"}, spec).train_cmd()

    for base in (["--wandb", "proj"], ["--wandb=proj"]):
        cmd = train_cmd(*base)
        assert cmd.count("--wandb-group") == 1 and cmd[cmd.index("--wandb-group") + 1] == "grid-1"
    assert train_cmd("--wandb", "proj", "--wandb-group", "mine").count("--wandb-group") == 1  # the user's group
    assert "--wandb-group" not in train_cmd()  # no W&B, no group
