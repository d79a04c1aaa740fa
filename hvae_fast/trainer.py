"""The training loop: optimizer and schedule, clipping, non-finite skips, atomic checkpoints and
exact resume, metrics, periodic validation and sample grids.

Run directory layout::

    config.json              the full RunConfig
    metrics.jsonl            one JSON object per logged step (train) or evaluation (valid)
    checkpoint-latest.pt     written atomically every `checkpoint_every` steps and at the end
    checkpoint-best.pt       the best validation ELBO so far
    samples-<step>.png       sample grids from the unsmoothed generative model
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch

from . import data as data_mod
from .config import RunConfig
from .errors import HVAEError
from .evaluate import evaluate
from .likelihoods import bits_per_dim
from .model import OUSmoothing, build_model, count_parameters
from .objectives import kl_weight, training_loss
from .ou import get_backend

log = logging.getLogger("hvae_fast.trainer")

# A run that produces only non-finite updates for this many steps in a row is stopped.
MAX_CONSECUTIVE_NONFINITE = 50
# Fields that may differ between a run's saved config and a resume request.
RESUMABLE_CHANGES = {("train", "steps"), ("device",), ("ou", "backend"), ("train", "eval_every"),
                     ("train", "log_every"), ("train", "checkpoint_every"), ("train", "sample_every")}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HVAEError("--device cuda was asked for but torch sees no CUDA device: pass --device cpu (or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise HVAEError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def lr_lambda(cfg):
    """Multiplier of the base lr at a step: linear warm-up, then constant / cosine / exponential decay."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        if t.lr_schedule == "cosine":
            return t.lr_decay + (1 - t.lr_decay) * 0.5 * (1 + math.cos(math.pi * frac))
        if t.lr_schedule == "exponential":
            return t.lr_decay ** frac
        return 1.0

    return f


def config_diff(a: dict, b: dict, prefix=()) -> list:
    """Paths (tuples of keys) at which two nested config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, prefix + (k,))
        elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            out.append(prefix + (k,))
    return out


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """images [N, C, H, W] in [0, 1] (or [-1, 1] for RGB) -> one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    x = images.detach().float().cpu()
    if x.min() < 0:
        x = (x + 1) / 2
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.ones(c, nrows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    if c == 1:
        mpimg.imsave(tmp, arr[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        mpimg.imsave(tmp, arr)
    os.replace(tmp, path)


class Trainer:
    """Trains one RunConfig into one run directory. ``Trainer(cfg, out, data_dir).fit()``."""

    def __init__(self, cfg: RunConfig, out_dir, data_dir=None, resume: bool = False, progress: bool = True):
        self.cfg = cfg.validate()
        self.out = Path(out_dir)
        self.data_dir = data_dir
        self.progress = progress
        self.device = resolve_device(cfg.device)
        self._prepare_run_dir(resume)

        t = cfg.train
        torch.manual_seed(t.seed)
        self.train_set = data_mod.load_dataset(cfg.dataset, "train", data_dir)
        self.valid_set = data_mod.load_dataset(cfg.dataset, "valid", data_dir)
        self.stream = data_mod.BatchStream(self.train_set, t.batch_size, seed=t.seed)
        if cfg.model.likelihood != self.train_set.likelihood:
            raise HVAEError(f"preset {cfg.preset!r} uses a {cfg.model.likelihood} likelihood but {cfg.dataset} needs "
                            f"{self.train_set.likelihood}: pick a preset made for {cfg.dataset} (`hvae-fast presets`)")
        self.model = build_model(cfg.method, cfg.model, self.train_set.image_shape).to(self.device)
        self.ou = None
        if cfg.method == "hvae":
            backend = get_backend(cfg.ou.backend, self.device)
            self.backend_name = backend.name
            self.ou = OUSmoothing(cfg.ou.rho, cfg.ou.samples, backend, cfg.ou.target, cfg.ou.smooth_inference,
                                  cfg.ou.recompute)
        else:
            self.backend_name = None
        opt_cls = torch.optim.Adamax if t.optimizer == "adamax" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=t.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.skipped = 0
        self._nonfinite_run = 0  # consecutive skipped steps; MAX_CONSECUTIVE_NONFINITE stops the run
        self.best_valid = -math.inf
        if resume:
            self._load(self.out / "checkpoint-latest.pt")
        self.tb = self._tensorboard()

    # -- run directory --------------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise HVAEError(f"cannot write to the output directory {self.out}: {exc.strerror}; pass --out to a writable folder") from exc
        ckpt = self.out / "checkpoint-latest.pt"
        cfg_path = self.out / "config.json"
        if resume:
            if not ckpt.exists():
                raise HVAEError(f"--resume: no checkpoint-latest.pt in {self.out}; start without --resume or pass the run's --out")
            saved = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
            if saved is not None:
                diff = [p for p in config_diff(saved, self.cfg.to_dict()) if p not in RESUMABLE_CHANGES]
                if diff:
                    names = ", ".join(".".join(p) for p in diff)
                    raise HVAEError(f"--resume: the config differs from the checkpoint's in {names}; "
                                    f"resume with the run's own settings (see {cfg_path}) or start a new --out")
        elif ckpt.exists():
            raise HVAEError(f"{self.out} already holds a run (checkpoint-latest.pt): pass --resume to continue it, "
                            f"or --out for a new run")
        atomic_write_text(self.cfg.to_json() + "\n", cfg_path)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tb"))

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "stream": self.stream.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "skipped": self.skipped,
            "best_valid": self.best_valid,
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str = "checkpoint-latest.pt") -> None:
        atomic_save(self._state(), self.out / name)

    def _load(self, path: Path) -> None:
        try:
            st = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise HVAEError(f"cannot read checkpoint {path}: {exc}; it may be truncated: restore it or start a new --out") from exc
        try:
            self.model.load_state_dict(st["model"])
        except RuntimeError as exc:
            raise HVAEError(f"checkpoint {path} does not match the model of this config: {str(exc).splitlines()[0]}") from exc
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.stream.load_state_dict(st["stream"])
        torch.set_rng_state(st["rng_cpu"].cpu())
        if st.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in st["rng_cuda"]])
        self.step, self.skipped, self.best_valid = st["step"], st["skipped"], st["best_valid"]
        log.info("resumed %s at step %d", path, self.step)

    # -- metrics --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])
                elif isinstance(v, list):
                    for i, vi in enumerate(v):
                        self.tb.add_scalar(f"{record.get('split', 'train')}/{k}/{i + 1}", vi, record["step"])

    @torch.no_grad()
    def _unsmoothed_stats(self, x) -> dict:
        """ELBO and per-layer KL of the unsmoothed model on a batch, off the training RNG stream."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step)
            t = self.model(x)
        kls = [k.mean().item() for k in t.kl]
        out = {"elbo": t.log_weight.mean().item(), "recon": t.log_px.mean().item(), "kl_per_layer": kls,
               "kl_total": sum(kls), "top_kl": kls[-1]}
        if self.model.likelihood.kind == "logistic":
            out["bpd"] = bits_per_dim(-out["elbo"], x[0].numel())
        return out

    def validate(self) -> dict:
        t = self.cfg.train
        batches = lambda: data_mod.eval_batches(self.valid_set, t.batch_size, 0, t.eval_examples)  # noqa: E731
        # Active units with eval's estimator (10 samples), so metrics.jsonl and `hvae-fast eval` agree.
        return evaluate(self.model, batches, self.device, iw_samples=0, au_samples=10, seed=0)

    def write_samples(self, name: str) -> Path:
        gen = torch.Generator(device=self.device).manual_seed(0)
        imgs = self.model.sample(64, generator=gen)
        path = self.out / name
        save_image_grid(imgs, path)
        return path

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self, x) -> dict:
        t = self.cfg.train
        beta = kl_weight(self.step, *t.kl_anneal)
        loss, bound = training_loss(self.model, x, self.cfg.method, self.ou, beta, t.free_bits, t.iw_samples_train)
        self.opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            finite = bool(torch.isfinite(gn))
        if finite:
            self.opt.step()
            self._nonfinite_run = 0
        else:
            self.skipped += 1
            self._nonfinite_run += 1
            if self._nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                self.save()
                raise HVAEError(f"the loss or its gradient was NaN/inf for {MAX_CONSECUTIVE_NONFINITE} steps in a row "
                                f"(step {self.step}); the last good state is in {self.out / 'checkpoint-latest.pt'}. "
                                f"Lower --lr, or raise the model's min_scale")
        with warnings.catch_warnings():
            # A skipped update still advances the schedule, so lr stays a function of the step.
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
        self.step += 1
        return {"loss": loss.item(), "bound": bound.mean().item(), "kl_weight": beta, "finite": finite}

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        t = self.cfg.train
        log.info("training %s (%s, %d parameters) on %s for %d steps; OU backend: %s",
                 self.cfg.preset, self.cfg.method, count_parameters(self.model), self.device, t.steps, self.backend_name)
        self.model.train()
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), self.step
        record = {}
        while self.step < t.steps:
            x = next(self.stream).to(self.device, non_blocking=True)
            out = self.train_step(x)
            if self.step % t.log_every == 0 or self.step == t.steps:
                now = time.perf_counter()
                sps = (self.step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, self.step
                record = {"split": "train", "step": self.step, "loss": out["loss"], "train_bound": out["bound"],
                          "kl_weight": out["kl_weight"], "lr": self.sched.get_last_lr()[0],
                          "skipped": self.skipped, "steps_per_s": sps, **self._unsmoothed_stats(x)}
                self._log(record)
                bar.set_postfix(loss=f"{out['loss']:.2f}", top_kl=f"{record['top_kl']:.2f}", it_s=f"{sps:.1f}")
            if self.step % t.eval_every == 0 or self.step == t.steps:
                res = self.validate()
                self._log({"split": "valid", "step": self.step, **res})
                if res["elbo"] > self.best_valid:
                    self.best_valid = res["elbo"]
                    self.save("checkpoint-best.pt")
            if self.step % t.sample_every == 0 or self.step == t.steps:
                self.write_samples(f"samples-{self.step:07d}.png")
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.save()
            bar.update(1)
        bar.close()
        if self.tb is not None:
            self.tb.close()
        return record
