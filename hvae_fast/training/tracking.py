"""Experiment trackers: where a run's records, sample grids and settings go besides metrics.jsonl and
the PNGs. TensorBoard (RUN_DIR/tb, whenever tensorboard is importable) and Weights & Biases
(``--wandb PROJECT``, optional extra ``[wandb]``) take the same calls, from the trainer's main
process only:

    start(cfg, resumed_at)   the run's config (TensorBoard: hparams) as training starts, or resumes
                             from the checkpoint of step ``resumed_at``
    log(record)              one metrics.jsonl record (its numbers, lists as one value per layer);
                             a validation record also carries "best_elbo", the best so far
    image(tag, grid, step)   a sample grid: rundir.image_grid's [C, H, W] in [0, 1]
    close(finished)          the end; ``finished``: the run reached its last step
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from ..config import RunConfig, as_flag_value, config_fields
from ..errors import HVAEError
from .rundir import atomic_write_text, refuse_link

log = logging.getLogger("hvae_fast.training.tracking")

# The run's own file with its W&B run id (and project), so that --resume continues the same W&B run.
WANDB_STATE = "wandb.json"
# The hparams dashboard's metrics: scalars the trainer logs at every validation.
HPARAM_METRICS = ("valid/elbo", "valid/best_elbo")
INSTALL_WANDB = "pip install 'hvae-fast[wandb]'"


def scalars(record: dict) -> dict:
    """A record as {tag: number}: "train/loss", "valid/elbo", one "train/kl_per_layer/<layer>" per
    layer (bottom layer 1); its split and step, and None values (e.g. no rho), are not values."""
    split, out = record.get("split", "train"), {}
    for k, v in record.items():
        if k in ("split", "step") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{split}/{k}"] = v
        elif isinstance(v, list):
            out.update({f"{split}/{k}/{i + 1}": vi for i, vi in enumerate(v) if isinstance(vi, (int, float))})
    return out


def flat_config(cfg: RunConfig) -> dict:
    """The config as one level of scalars and strings: {"method": "hvae", "train.lr": 0.001,
    "model.latent_sizes": "40,40,40,40", ...} (tuples as their flag value)."""
    out = {}
    for section, f in config_fields():
        v = getattr(getattr(cfg, section) if section else cfg, f.name)
        out[f"{section}.{f.name}" if section else f.name] = (
            v if isinstance(v, (bool, int, float, str)) else as_flag_value(v) if isinstance(v, tuple) else str(v))
    return out


def check(cfg: RunConfig) -> None:
    """HVAEError before a run starts (nothing written yet) when --wandb is given and wandb cannot be
    imported: asking for W&B and silently not getting it would lose the run's records there."""
    if not cfg.train.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise HVAEError(f"--wandb {cfg.train.wandb} logs to Weights & Biases, but wandb is not installed: "
                        f"{INSTALL_WANDB} (or drop --wandb)") from None


def open_trackers(out: Path, cfg: RunConfig) -> list:
    """The run's trackers: TensorBoard when tensorboard is importable, W&B with --wandb."""
    trackers = []
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:  # tensorboard is optional (absent, or too old for torch)
        pass
    else:
        trackers.append(TensorBoard(out))
    if cfg.train.wandb:
        try:
            trackers.append(WandB(out, cfg))
        except BaseException:
            for t in trackers:
                t.close(False)
            raise
    return trackers


class TensorBoard:
    """RUN_DIR/tb: scalars under "<split>/<key>", sample grids under "samples", the config as hparams."""

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tb"))

    def start(self, cfg: RunConfig, resumed_at: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard.summary import hparams

        step = 0
        if resumed_at is not None:
            # TensorBoard drops the events an earlier attempt wrote past the checkpoint (logged again
            # from here, as metrics.jsonl's are) when it reads a START at the next step.
            step = resumed_at + 1
            self.w.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        # The hparams dashboard reads its metrics' values from the scalars of the same tags, so the
        # config goes in as the run starts (a running run shows up) and a resume writes its own.
        exp, ssi, _ = hparams(flat_config(cfg), dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (exp, ssi):
            self.w.file_writer.add_summary(summary, step)

    def log(self, record: dict) -> None:
        for tag, v in scalars(record).items():
            self.w.add_scalar(tag, v, record["step"])

    def image(self, tag: str, grid, step: int) -> None:
        self.w.add_image(tag, grid, step, dataformats="CHW")

    def close(self, finished: bool) -> None:
        if finished:
            from torch.utils.tensorboard.summary import hparams

            self.w.file_writer.add_summary(hparams({}, {})[2])  # session end: status success
        self.w.close()


class WandB:
    """A W&B run in project --wandb (group --wandb-group), named after the run folder, with the config
    as its config. Its id is kept in RUN_DIR/wandb.json, so --resume continues the same W&B run;
    W&B's own files go to $WANDB_DIR, else RUN_DIR/wandb. WANDB_MODE=offline runs without a network
    (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later)."""

    def __init__(self, out: Path, cfg: RunConfig):
        import wandb

        self.wandb, t = wandb, cfg.train
        state = out / WANDB_STATE
        refuse_link(state)
        try:
            prev = json.loads(state.read_text())
        except FileNotFoundError:
            prev = {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): starting a new W&B run", state, exc)
            prev = {}
        prev = prev if isinstance(prev, dict) else {}
        rid = prev.get("id")
        same = prev.get("project") == t.wandb and isinstance(rid, str) and rid.isascii() and rid.isalnum()
        run_id = rid if same else secrets.token_hex(4)  # W&B's own ids: 8 characters
        # Written before the run starts: a process killed inside wandb.init still resumes this id.
        atomic_write_text(json.dumps({"id": run_id, "project": t.wandb}) + "\n", state)
        try:
            self.run = wandb.init(project=t.wandb, group=t.wandb_group or None, name=out.name, id=run_id,
                                  resume="allow", dir=None if os.environ.get("WANDB_DIR") else str(out))
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HVAEError(f"W&B could not start run {run_id} in project {t.wandb}: {why}; "
                            f"check `wandb login` and the network, or set WANDB_MODE=offline") from None
        self.run.config.update(cfg.to_dict(), allow_val_change=True)  # a resume may change --steps
        # W&B drops records at a step below its run's own (the steps a resumed run had logged before
        # its last stop, known online only): skip them here instead of a warning for each.
        self.floor = int(getattr(self.run, "starting_step", 0) or 0)

    def start(self, cfg: RunConfig, resumed_at: int | None) -> None:
        pass  # the config went in with the run

    def log(self, record: dict) -> None:
        if record["step"] >= self.floor:
            self.run.log(scalars(record), step=record["step"])

    def image(self, tag: str, grid, step: int) -> None:
        if step >= self.floor:
            arr = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
            self.run.log({tag: self.wandb.Image(arr[:, :, 0] if arr.shape[2] == 1 else arr,
                                                caption=f"step {step}")}, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
