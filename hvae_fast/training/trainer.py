"""The training loop: optimizer and schedule, clipping, non-finite skips, safe checkpoints and
exact resume, metrics, periodic validation and sample grids. The run folder it writes (its layout,
lock, atomic writes and checkpoint checks) is rundir.py's; the experiment trackers it also logs to
(TensorBoard, W&B) are tracking.py's.

Under torchrun (distributed.py) rank 0 holds the lock, logs and writes every file; a checkpoint of a
run of W processes also holds "world_size" and, in "ranks", every process's RNG and data-stream
state, and resumes only with W processes.

A periodic checkpoint of step s is written only once step s + 1 has produced a finite loss and
gradient from its weights, so a run stopped by NaN/inf keeps its last good weights.

A new run needs a new or empty --out. A folder with other files is refused untouched; one with run
files but no checkpoint-latest.pt (an attempt that died before its first checkpoint) is refused too:
remove it and train again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shlex
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from ..ops import autotune
from .. import data as data_mod
from . import distributed
from ..config import RunConfig
from ..errors import HVAEError
from .evaluate import evaluate
from ..models.likelihoods import bits_per_dim
from ..models.model import count_parameters
from ..models.objectives import kl_weight, training_loss
from .build import Training, build_training, clip_gradients, lr_lambda  # noqa: F401 (the README's Python API imports them here)
from . import tracking
from .rho_control import RhoController
from .rundir import (LATEST, append_metrics, atomic_save, atomic_write_text, check_run_dir, image_grid, load_checkpoint,
                     load_run, lock_run_dir, resolve_device, save_grid, save_image_grid, trim_metrics)

__all__ = ["Trainer", "TrainingInterrupted", "Training", "build_training", "load_run", "save_image_grid"]

log = logging.getLogger("hvae_fast.training.trainer")

# --precision: the autocast dtype of the nets (fp32: no autocast).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A run that produces only non-finite updates for this many steps in a row is stopped.
MAX_CONSECUTIVE_NONFINITE = 50
# With the progress bar off, a status line at a logged step at most this often (seconds).
STATUS_SECONDS = 30.0
# The first time-to-finish estimate: the first step (compiles, autotunes) and ETA_WARMUP_STEPS more
# (allocator, caches, thread pools) are not timed; the steps after them are timed, validation left
# out, for at least ETA_STEPS steps and ETA_SECONDS seconds before the estimate is logged (ten steps
# from the first were reported 3.5x optimistic).
ETA_WARMUP_STEPS = 5
ETA_STEPS = 20
ETA_SECONDS = 5.0
# One validation batch in training steps of the same batch, until a validation pass has been timed:
# an unsmoothed forward (a step also runs backward, and its OU samples) plus the active-units pass.
VALID_BATCH_STEPS = 0.75


class _ValidationStopped(Exception):
    """A signal stopped a validation pass (raised by the signal handler, caught in fit)."""


class TrainingInterrupted(HVAEError):
    """SIGINT / SIGTERM stopped a run after writing checkpoint-latest.pt; exit with ``exit_code`` (128 + signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def format_duration(seconds: float) -> str:
    """'45 s', '12 min 05 s', '3 h 07 min', '2 d 04 h'."""
    s = int(round(max(seconds, 0.0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d} d {h:02d} h"
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s:02d} s" if m else f"{s} s"


def validations_left(step: int, steps: int, eval_every: int) -> int:
    """Validation passes still to come in a run that has just done ``step`` (of ``steps``), its own
    included: one every ``eval_every`` steps and one at the last step."""
    step = max(step, 1)
    if step > steps:
        return 0
    return steps // eval_every - (step - 1) // eval_every + (steps % eval_every != 0)


def eta_seconds(step: int, steps: int, step_seconds: float, eval_every: int, valid_seconds: float) -> float:
    """Seconds from the end of ``step`` to the end of the run: the training steps left at
    ``step_seconds`` each and the validation passes still to come at ``valid_seconds`` each."""
    return max(steps - step, 0) * step_seconds + validations_left(step, steps, eval_every) * valid_seconds


class Pace:
    """The run's measured pace, from the times (``now``, seconds) it is told: seconds per training
    step, timed from the end of the warm-up steps with validation time left out, and seconds per
    validation pass (the last one timed, else ``valid_batches`` x VALID_BATCH_STEPS steps)."""

    def __init__(self, step: int, valid_batches: int):
        self.warm_until = step + 1 + ETA_WARMUP_STEPS  # the clock restarts at the end of each of these steps
        self.valid_batches = valid_batches
        self.t0 = self.s0 = None
        self.aside = 0.0  # seconds of validation since t0
        self.valid_timed = None  # seconds of the last validation pass
        self.told = False  # the first estimate has been logged

    def step_done(self, step: int, now: float) -> None:
        if self.t0 is None or step <= self.warm_until:
            self.t0, self.s0, self.aside = now, step, 0.0

    def validated(self, seconds: float) -> None:
        self.valid_timed = seconds
        if self.t0 is not None:
            self.aside += seconds

    def timed(self, step: int, now: float) -> tuple:
        """(steps timed, seconds of training they took)."""
        if self.t0 is None:
            return 0, 0.0
        return step - self.s0, now - self.t0 - self.aside

    def step_seconds(self, step: int, now: float) -> float | None:
        n, secs = self.timed(step, now)
        return secs / n if n > 0 else None

    def valid_seconds(self, step_seconds: float) -> float:
        return self.valid_timed if self.valid_timed is not None else self.valid_batches * VALID_BATCH_STEPS * step_seconds

    def eta(self, step: int, steps: int, eval_every: int, now: float) -> float | None:
        """Seconds to the end of the run, validations included; None before a step has been timed."""
        sps = self.step_seconds(step, now)
        return None if sps is None else eta_seconds(step, steps, sps, eval_every, self.valid_seconds(sps))

    def first_estimate_due(self, step: int, now: float) -> bool:
        """True once, when enough steps and seconds have been timed for the first estimate."""
        n, secs = self.timed(step, now)
        if self.told or n < ETA_STEPS or secs < ETA_SECONDS:
            return False
        self.told = True
        return True


def scale_notes(cfg: RunConfig, device: torch.device, n_params: int) -> list:
    """Lines for the log before training: the run's scale, and a pointer to a CPU-sized run when a
    GPU-sized preset is about to train on the CPU."""
    t = cfg.train
    size = f"{n_params / 1e6:.2f}M" if n_params >= 1e6 else f"{n_params:,}"
    notes = [f"{cfg.preset} ({cfg.method}) on {device}: {size} parameters, "
             f"{t.steps} steps of batch {t.batch_size}"]
    if device.type == "cpu" and cfg.dataset == "cifar10" and cfg.method != "ladder":  # the ladder's are CPU-sized
        notes.append(f"{cfg.preset} is sized for a GPU (weeks on a CPU): for a CPU run pass a small --steps "
                     f"(e.g. --steps 500) or train a CPU-sized preset: `hvae-fast train binarized-mnist` (mnist-mlp-40x4)")
    return notes


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    msg = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in msg or "not enough memory" in msg))


class Trainer:
    """Trains one RunConfig into one run directory. ``Trainer(cfg, out, data_dir).fit()``.

    The Trainer holds the run directory's lock from construction until ``fit`` returns (or ``close``)."""

    def __init__(self, cfg: RunConfig, out_dir, data_dir=None, resume: bool = False, progress: bool = True):
        self.cfg = cfg.validate()
        self.out = Path(out_dir)
        self.data_dir = data_dir
        self._lock = None
        self.trackers = []  # tracking.py's, on the main process
        self._closed = False
        self.pace = None  # the run's measured pace (Pace), from fit's start
        tracking.check(self.cfg)  # a missing wandb fails here, before the run folder is touched
        self.world, self.device = distributed.setup(resolve_device(cfg.device))
        self.progress = progress and self.world.main
        try:
            state = self._join(resume)
            t = cfg.train
            torch.manual_seed(t.seed)
            self.stream = data_mod.BatchStream(self.train_set, t.batch_size, seed=t.seed)
            if cfg.model.likelihood != self.train_set.likelihood:
                raise HVAEError(f"preset {cfg.preset!r} uses a {cfg.model.likelihood} likelihood but {cfg.dataset} needs "
                                f"{self.train_set.likelihood}: pick a preset made for {cfg.dataset} (`hvae-fast presets`)")
            tr = build_training(cfg, self.device, self.train_set.image_shape)
            self.model, self.opt, self.sched, self.ou, self.backend_name = tr.model, tr.opt, tr.sched, tr.ou, tr.backend
            self._auto = self.ou is not None and self.backend_name == "auto"
            # The training forward runs through DDP (gradients averaged over processes); everything
            # else (checkpoints, hooks, validation, samples) uses the model itself.
            self.net = self.model
            if self.world.size > 1:
                # --compile: DDP around the compiled model (dynamo cannot trace DDP's own forward
                # with fullgraph; its logging calls break the graph), so the model is one graph and
                # DDP's gradient hooks fire from the compiled backward. See _compiled_loss.
                inner = torch.compile(self.model, fullgraph=True) if t.compile else self.model
                self.net = torch.nn.parallel.DistributedDataParallel(inner)
                if self.ou is not None:
                    self.ou.backend = distributed.shard_backend(self.ou.backend, self.world)
            self.rho = tr.rho
            # fp16's loss scaling (bf16 has float32's exponent range and needs none); disabled, it is a no-op.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
            self.controller = tr.rho if isinstance(tr.rho, RhoController) else None
            self._top_kl = None
            if self.controller is not None:
                # The controller's input: the top layer's KL of the training forward (a hook, so the
                # loss computation stays as it is); read in train_step right after that forward.
                self.model.register_forward_hook(self._keep_top_kl)
            self.step = 0
            self.skipped = 0
            self._nonfinite_run = 0  # consecutive skipped steps; MAX_CONSECUTIVE_NONFINITE stops the run
            self.best_valid = -math.inf
            self._saved_step = None  # step held by checkpoint-latest.pt
            # A signal stopped the validation of this step: it runs before the next training step.
            self._valid_pending = self._validating = False
            if state is not None:
                self._restore(state)
            self._save_due = False
            self._pending = None
            self._signal = self._signal_seen = None  # agreed by every process / seen by this one
            if self.world.main:
                atomic_write_text(self.cfg.to_json() + "\n", self.out / "config.json")
                if state is not None:  # the records logged after the checkpoint are logged again
                    trim_metrics(self.out, self.step)
            if state is None:
                self.save()  # the initial weights: from here on the folder is a run that resumes
            if self.world.main:
                self.trackers = tracking.open_trackers(self.out, self.cfg)
                for tracker in self.trackers:
                    tracker.start(self.cfg, self.step if state is not None else None)
        except BaseException:
            self.close()
            raise

    def _join(self, resume: bool):
        """Take the run directory (rank 0) and load the data (rank 0 first, so a download or parse
        happens once); every process gets the checkpoint to resume from (or None) or the same error."""
        w, t = self.world, self.cfg.train
        error = state = None
        if w.size > 1:
            if t.batch_size % w.size:
                error = (f"--batch-size {t.batch_size} is the global batch and must split evenly over the {w.size} "
                         f"processes: pass a multiple of {w.size}")
        if w.main and error is None:
            try:
                self._lock = lock_run_dir(self.out)
                state = check_run_dir(self.out, self.cfg, self.world.size, resume, self.device)
                self._load_data()
            except HVAEError as exc:
                error = str(exc)
        w.agree(error)
        if not w.main:
            self._load_data()
            if resume:
                state = load_checkpoint(self.out / LATEST, self.device)
        return state

    def _load_data(self) -> None:
        self.train_set = data_mod.load_dataset(self.cfg.dataset, "train", self.data_dir)
        self.valid_set = data_mod.load_dataset(self.cfg.dataset, "valid", self.data_dir)
        n = min(self.cfg.train.eval_examples or len(self.valid_set), len(self.valid_set))
        if n < self.world.size:
            raise HVAEError(f"validation on {n} examples cannot be shared by {self.world.size} processes: "
                            f"pass --eval-examples {self.world.size} or more")

    def resume_command(self) -> str:
        cmd = ["train", self.cfg.dataset, "--out", str(self.out), "--resume"]
        cmd = shlex.join(cmd + (["--data-dir", str(self.data_dir)] if self.data_dir else []))
        return (distributed.launch_command(self.world) + "hvae_fast " if self.world.size > 1 else "hvae-fast ") + cmd

    def close(self, finished: bool = False) -> None:
        """Close the trackers, release the run directory and leave the process group (``finished``:
        every process ended the run normally, so they can wait for each other first)."""
        self._closed = True
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(finished)
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None
        if self.world.size > 1:
            distributed.teardown(barrier=finished)

    # -- checkpoints ----------------------------------------------------------------------------
    def _position(self) -> dict:
        """Where the run stands between two steps: the step, the data stream, the RNGs and the rho
        controller; with several processes, "ranks" holds each one's stream and RNGs (a collective)."""
        mine = {"stream": self.stream.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "auto_backend": autotune.decisions_in_use(self.device) if self._auto else {}}
        pos = {"step": self.step, **mine, "world_size": self.world.size,
               "rho_control": self.controller.state_dict() if self.controller is not None else None}
        if self.world.size > 1:
            pos["ranks"] = self.world.gather(mine)
        return pos

    def _state(self, position=None) -> dict:
        return {**(position or self._position()),
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "skipped": self.skipped,
                "best_valid": self.best_valid,
                "grad_scaler": self.scaler.state_dict(),  # {} unless --precision fp16
                "valid_pending": self._valid_pending,
                "config": json.loads(self.cfg.to_json())}

    def save(self, name: str = LATEST, position=None) -> bool:
        """Write checkpoint ``name`` of the current weights (at ``position``, default now) atomically.
        Returns False, writing nothing, when a parameter is NaN/inf. Every process calls it; rank 0 writes."""
        params = [p.detach() for p in self.model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            log.warning("not writing %s: the parameters hold NaN/inf", name)
            return False
        state = self._state(position)
        if self.world.main:
            atomic_save(state, self.out / name)
        if name == LATEST:
            self._saved_step, self._save_due, self._last_save = state["step"], False, time.monotonic()
        return True

    def _restore(self, st: dict) -> None:
        try:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise HVAEError(f"checkpoint-latest.pt in {self.out} does not match this config's model or optimizer: "
                            f"{str(exc).splitlines()[0]}; resume with the run's own settings or start a new --out") from None
        mine = st["ranks"][self.world.rank] if self.world.size > 1 else st
        self.stream.load_state_dict(mine["stream"])
        if st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        if self.controller is not None:
            self.controller.load_state_dict(st.get("rho_control"))
        if self._auto:
            autotune.pin_decisions(self.device, mine.get("auto_backend") or {})
        torch.set_rng_state(mine["rng_cpu"].cpu())
        if mine.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in mine["rng_cuda"]])
        self.step, self.skipped, self.best_valid = int(st["step"]), int(st["skipped"]), float(st["best_valid"])
        self._valid_pending = st.get("valid_pending") is True
        self._saved_step = self.step
        log.info("resumed %s at step %d", self.out / "checkpoint-latest.pt", self.step)

    # -- metrics --------------------------------------------------------------------------------
    def _log(self, record: dict, tracked: dict | None = None) -> None:
        """``record`` to metrics.jsonl and the trackers (these get ``tracked`` on top)."""
        if not self.world.main:
            return
        append_metrics(self.out, record)
        for t in self.trackers:
            t.log({**record, **(tracked or {})})

    @torch.no_grad()
    def _unsmoothed_stats(self, x) -> dict:
        """ELBO and per-layer KL of the unsmoothed model on a batch (this process's rows, averaged over
        processes), off the training RNG stream."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step)
            t = self.model(x)
        elbo, recon, *kls = self.world.mean(torch.stack([t.log_weight.mean(), t.log_px.mean(),
                                                         *[k.mean() for k in t.kl]])).tolist()
        out = {"elbo": elbo, "recon": recon, "kl_per_layer": kls, "kl_total": sum(kls), "top_kl": kls[-1]}
        if self.model.likelihood.kind == "logistic":
            out["bpd"] = bits_per_dim(-out["elbo"], x[0].numel())
        return out

    def validate(self) -> dict:
        """The unsmoothed model on the validation examples; each process takes its rows of every batch
        (and its own noise seed, the rank) and the sums are all-reduced."""
        t, w = self.cfg.train, self.world

        def batches():
            for x in data_mod.eval_batches(self.valid_set, t.batch_size, 0, t.eval_examples):
                if len(x[w.rows(len(x))]):
                    yield x[w.rows(len(x))]

        # Active units with eval's estimator (10 samples), so metrics.jsonl and `hvae-fast eval` agree.
        return evaluate(self.model, batches, self.device, iw_samples=0, au_samples=10, seed=w.rank,
                        reduce=w.sum if w.size > 1 else None, progress=self.progress,
                        num_batches=self._valid_batches())

    def _valid_batches(self) -> int:
        t = self.cfg.train
        n = min(t.eval_examples or len(self.valid_set), len(self.valid_set))
        return math.ceil(n / t.batch_size)

    def _validation(self) -> bool:
        """Validate at this step, log it and keep the best checkpoint. A signal stops the pass (in a
        one-process run: stopping one process of several would leave the others waiting in its
        all-reduce) and leaves it due: returns False."""
        started = time.monotonic()
        if not self.progress and self.world.main:
            log.info("validating step %d on %d examples", self.step,
                     min(self.cfg.train.eval_examples or len(self.valid_set), len(self.valid_set)))
        self._validating = self.world.size == 1
        try:
            res = self.validate()
        except _ValidationStopped:
            self._valid_pending = True
            self.model.train()  # evaluate() restores the mode only when it finishes
            return False
        finally:
            self._validating = False
        self._valid_pending = False
        if self.pace is not None:
            self.pace.validated(time.monotonic() - started)
        best = res["elbo"] > self.best_valid
        if best:
            self.best_valid = res["elbo"]
        # The trackers' hparams metric (tracking.HPARAM_METRICS): the best validation ELBO so far.
        self._log({"split": "valid", "step": self.step, **res}, {"best_elbo": self.best_valid})
        if not self.progress and self.world.main:
            log.info("validation at step %d: ELBO %.2f (%s)", self.step, res["elbo"],
                     format_duration(time.monotonic() - started))
        if best:
            self.save("checkpoint-best.pt")
        return True

    def write_samples(self, name: str) -> Path | None:
        if not self.world.main:
            return None
        gen = torch.Generator(device=self.device).manual_seed(0)
        grid = image_grid(self.model.sample(64, generator=gen))
        path = self.out / name
        save_grid(grid, path)
        for t in self.trackers:
            t.image("samples", grid, self.step)
        return path

    # -- the loop -------------------------------------------------------------------------------
    def _keep_top_kl(self, module, args, terms) -> None:
        self._top_kl = terms.kl[-1].detach().mean()

    @functools.cached_property
    def _compiled_loss(self):
        """training_loss under torch.compile (--compile): model forward and loss in one graph
        (fullgraph: a graph break is an error), their backward compiled by AOTAutograd. The OU seeds
        the model draws with .item() stay in the graph (capture_scalar_outputs); fallback_random keeps
        torch's RNG stream, so a compiled run draws the eager run's noise and resumes exactly; beta
        goes in as a 0-d tensor so that KL annealing does not recompile.

        Under torchrun the model inside the DDP wrapper is compiled (fullgraph, see __init__) and the
        loss around it stays eager."""
        fn = training_loss if self.world.size > 1 else torch.compile(training_loss, fullgraph=True)

        def loss(model, x, method, ou, beta, free_bits, iw_k, global_mean=None):
            with torch._dynamo.config.patch(capture_scalar_outputs=True), \
                    torch._inductor.config.patch(fallback_random=True):
                return fn(model, x, method, ou, torch.tensor(beta, device=x.device), free_bits, iw_k, global_mean)

        return loss

    def train_step(self, x) -> dict:
        t = self.cfg.train
        beta = kl_weight(self.step, *t.kl_anneal)
        rho = None
        if self.ou is not None:
            self.ou.rho = rho = self.rho(self.step)
        loss_fn = self._compiled_loss if t.compile else training_loss
        amp = (torch.autocast(self.device.type, dtype=AMP_DTYPES[t.precision]) if t.precision in AMP_DTYPES
               else contextlib.nullcontext())
        with amp:  # the nets in bf16/fp16; the densities upcast their inputs (distributions.fp32)
            loss, bound = loss_fn(self.net, x, self.cfg.method, self.ou, beta, t.free_bits, t.iw_samples_train,
                                  self.world.mean if self.world.size > 1 else None)
        self.opt.zero_grad(set_to_none=True)
        # Means over the processes (one all-reduce): a NaN/inf on any process makes the loss's mean
        # non-finite, so every process skips the same steps; the rho controller sees the global top KL.
        means = self.world.mean(torch.stack([loss.detach(), bound.detach().mean()]
                                            + ([self._top_kl] if self.controller is not None else [])))
        finite = bool(torch.isfinite(means[0]))
        if finite:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)  # clip the true gradient, not the scaled one
            gn = clip_gradients(self.model, t.grad_clip)
            finite = bool(torch.isfinite(gn))
            if not finite and self.scaler.is_enabled():
                # fp16 overflow: skip the step and halve the loss scale (GradScaler's own policy);
                # it counts as skipped, so a scale that never recovers still stops the run.
                self.scaler.update()
        if finite:
            if self._pending is not None:
                # A finite loss and gradient from the weights this step started from vouch for them:
                # write the checkpoint that was due before they change.
                self.save(position=self._pending)
                self._pending = None
            self.scaler.step(self.opt)  # opt.step(); with fp16 it also checks the unscaled gradient
            self.scaler.update()
            self._nonfinite_run = 0
            if self.controller is not None:
                self.controller.observe(means[2].item())
        else:
            self.skipped += 1
            self._nonfinite_run += 1
            if self._nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                kept = (f"checkpoint-latest.pt holds the last good state (step {self._saved_step})"
                        if self._saved_step is not None else "no good state was checkpointed")
                raise HVAEError(f"the loss or its gradient was NaN/inf for {MAX_CONSECUTIVE_NONFINITE} steps in a row "
                                f"(step {self.step}); {kept}. Lower --lr (or raise the model's min_scale) "
                                f"and start a new --out")
        with warnings.catch_warnings():
            # A skipped update still advances the schedule, so lr stays a function of the step.
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
        self.step += 1
        return {"loss": means[0].item(), "bound": means[1].item(), "kl_weight": beta, "rho": rho, "finite": finite,
                "grad_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None}

    def _oom(self, exc) -> HVAEError:
        t, k = self.cfg.train, self.cfg.ou.samples if self.cfg.smooths() else 1
        return HVAEError(f"out of memory in training step {self.step + 1} on {self.device} (batch {t.batch_size}, "
                         f"{k} OU samples, {t.iw_samples_train} IW samples): lower --batch-size, --ou-samples or "
                         f"--iw-samples-train (`hvae-fast memory` estimates what fits)")

    def _on_signal(self, signum, frame) -> None:
        if self._signal_seen is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._signal_seen = signum
        if self._validating:
            self._validating = False
            log.warning("%s: stopping the validation and the run", signal.Signals(signum).name)
            raise _ValidationStopped
        log.warning("%s: stopping after this step", signal.Signals(signum).name)

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _agree(self, late: bool) -> bool:
        """At the end of a step, for every process alike: whether a checkpoint is overdue by the clock
        (of any process), and ``self._signal``, a signal any process has caught (else None)."""
        flags = self.world.max(torch.tensor([float(late), float(self._signal_seen or 0)]))
        self._signal = int(flags[1]) or None
        return bool(flags[0])

    def _interrupted(self) -> TrainingInterrupted:
        name, code = signal.Signals(self._signal).name, 128 + self._signal
        during = " (during its validation, which runs first on resume)" if self._valid_pending else ""
        return TrainingInterrupted(f"stopped by {name} after step {self.step}{during}; {self.resume_note()}", code)

    def resume_note(self) -> str | None:
        """Which step checkpoint-latest.pt holds and the exact command that resumes it (None before
        the first checkpoint)."""
        if self._saved_step is None:
            return None
        return f"checkpoint-latest.pt holds step {self._saved_step}: resume with `{self.resume_command()}`"

    def _status(self, rec: dict, now: float) -> None:
        t = self.cfg.train
        left = self.pace.eta(self.step, t.steps, t.eval_every, now)
        eta = "-" if left is None else format_duration(left)
        log.info("step %d/%d  loss %.2f  ELBO %.2f  %.2f steps/s  ETA %s", self.step, t.steps, rec["loss"],
                 rec["elbo"], rec["steps_per_s"], eta)

    def _first_estimate(self, now: float) -> None:
        t, pace = self.cfg.train, self.pace
        n, secs = pace.timed(self.step, now)
        secs = max(secs, 1e-9)
        sps = secs / n
        passes = validations_left(self.step, t.steps, t.eval_every)
        valid = (f"; {passes} validation{'s' if passes > 1 else ''} of about "
                 f"{format_duration(pace.valid_seconds(sps))} included") if passes else ""
        log.info("%.2f steps/s over %d steps: about %s to step %d%s", n / secs, n,
                 format_duration(pace.eta(self.step, t.steps, t.eval_every, now)), t.steps, valid)

    def fit(self) -> dict:
        """Train to cfg.train.steps; returns the last train record. Releases the run directory when done."""
        from tqdm.auto import tqdm

        if self._closed:
            raise HVAEError(f"this Trainer has released {self.out} (fit already ran): build a new one with resume=True")
        t = self.cfg.train
        for line in scale_notes(self.cfg, self.device, count_parameters(self.model)):
            log.info("%s", line)
        log.info("OU backend: %s; run directory %s; %d steps to go", self.backend_name, self.out, t.steps - self.step)
        w = self.world
        if w.size > 1:
            log.info("data-parallel: %d processes (DDP, %s); global batch %d, %d per process", w.size, w.backend,
                     t.batch_size, t.batch_size // w.size)
        self.model.train()
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        handlers = self._catch_signals()
        self._last_save = last_time = last_status = time.monotonic()
        last_step, first_log = self.step, True
        self.pace = Pace(self.step, self._valid_batches())
        record, finished = {}, False
        try:
            if self._valid_pending and not self._validation():  # stopped again
                self._agree(False)
                self.save()
                raise self._interrupted()
            while self.step < t.steps:
                if self._save_due:
                    self._pending = self._position()
                batch = next(self.stream)
                x = batch[w.rows(len(batch))].to(self.device, non_blocking=True)
                try:
                    with w.shard(len(batch)):
                        out = self.train_step(x)
                except RuntimeError as exc:
                    if is_out_of_memory(exc):
                        raise self._oom(exc) from None
                    raise
                now = time.monotonic()
                self.pace.step_done(self.step, now)
                if self.pace.first_estimate_due(self.step, now):
                    self._first_estimate(now)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    sps = (self.step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    with w.shard(len(batch)):
                        stats = self._unsmoothed_stats(x)
                    record = {"split": "train", "step": self.step, "loss": out["loss"], "train_bound": out["bound"],
                              "kl_weight": out["kl_weight"], "lr": self.sched.get_last_lr()[0],
                              "skipped": self.skipped, "steps_per_s": sps, **stats}
                    if out["rho"] is not None:
                        record["rho"] = out["rho"]  # the rho this step trained with
                    if out["grad_scale"] is not None:
                        record["grad_scale"] = out["grad_scale"]
                    self._log(record)
                    bar.set_postfix(loss=f"{out['loss']:.2f}", top_kl=f"{record['top_kl']:.2f}", it_s=f"{sps:.1f}")
                    if not self.progress and (first_log or now - last_status >= STATUS_SECONDS or self.step == t.steps):
                        self._status(record, now)
                        last_status = now
                    if first_log:  # an early checkpoint, long before checkpoint_every
                        self._save_due, first_log = True, False
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    self._validation()
                if self.step % t.sample_every == 0 or self.step == t.steps:
                    self.write_samples(f"samples-{self.step:07d}.png")
                late = self._agree(time.monotonic() - self._last_save >= 60 * t.checkpoint_minutes)
                if self.step % t.checkpoint_every == 0 or late:
                    self._save_due = True
                if self.step == t.steps or self._signal is not None:
                    self.save()
                bar.update(1)
                if self._signal is not None:
                    raise self._interrupted()
            finished = True
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            bar.close()
            self.close(finished)
        return record
