"""What a training run is built from: the model, its optimizer and LR schedule, and the OU smoothing
(``build_training``), without the loop; the trainer and `hvae-fast memory` build theirs here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import data as data_mod
from ..config import RunConfig
from ..models.model import OUSmoothing, build_model
from ..ops.ou import get_backend
from .rho_control import RhoController, RhoSchedule, parse_schedule


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


def make_optimizer(params, name: str, lr: float, device) -> torch.optim.Optimizer:
    """Adam as torch's fused kernel (all parameters in one call, on CPU and CUDA), Adamax as foreach
    ops (it has no fused kernel). torch's default on CPU is a Python loop of ~25 small ops per
    parameter tensor, the largest non-GEMM cost of an MLP step (bench/bench_optimizer.py measures
    the three against each other). A resumed run keeps the implementation its checkpoint was
    written with: Optimizer.load_state_dict restores the group's "fused"/"foreach" flags."""
    device = torch.device(device)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr, foreach=True)
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (a 0-d tensor), after scaling the gradients to at most ``max_norm``
    (<= 0: no clipping, the norm is still computed for the finiteness check). foreach: one norm
    over the whole list instead of one per tensor (torch's default on CPU)."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"), foreach=True)


@dataclass
class Training:
    """What one training step needs: the model, its optimizer and LR schedule, and the OU smoothing
    (None unless ``cfg.smooths()``; ``backend`` names its OU backend, ``rho`` maps the
    step index to the step's rho: a RhoSchedule, or the RhoController of --rho-control)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ou: OUSmoothing | None
    backend: str | None
    rho: RhoSchedule | RhoController | None = None


def build_training(cfg: RunConfig, device, image_shape=None) -> Training:
    """Model + optimizer + LR schedule + OU smoothing of ``cfg`` on ``device``.

    image_shape (C, H, W) defaults to the dataset's; the model's initial weights come from torch's
    global RNG (seed it first for a reproducible run)."""
    device = torch.device(device)
    model = build_model(cfg.method, cfg.model, image_shape or data_mod.image_shape(cfg.dataset)).to(device)
    ou = backend = rho = None
    if cfg.smooths():
        o = cfg.ou
        b = get_backend(o.backend, device)
        ou = OUSmoothing(o.rho, o.samples, b, o.target, o.smooth_inference, o.recompute)
        backend = b.name
        rho = RhoController(o.rho_control, o.rho_min, o.rho) if o.rho_control > 0 else parse_schedule(o.rho_schedule, o.rho)
    t = cfg.train
    opt = make_optimizer(model.parameters(), t.optimizer, t.lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return Training(model, opt, sched, ou, backend, rho)
