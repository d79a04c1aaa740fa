"""A rho that changes during training: fixed schedules (``--rho-schedule``) and a feedback
controller (``--rho-control TOP_KL_NATS``). Pure Python; the trainer sets ``OUSmoothing.rho`` from
one of these before every step.

Schedules are functions of the 0-based index of the step about to run (the same index
``kl_weight`` takes):

    constant                       rho = --rho throughout
    linear:START:END:STEPS         START to END linearly over STEPS steps, then END
    cosine:START:END:STEPS         START to END along a half cosine over STEPS steps, then END
    ...:hold=H                     (either ramp) START for the first H steps, then the ramp

The controller, in the spirit of ControlVAE (Shao et al. 2020: a PI controller of the KL weight),
steers rho instead of the KL weight. Its input is the top layer's KL of each training minibatch
(the prior p(z_L) and the posterior are not smoothed, so this is the model's own KL), smoothed by
an exponential moving average. With the relative error e = clip((KL_ema - target) / target, -1, 1):

    I   <- clip(I + KI * e, rho_min, 1)        integral; clamped, so it never winds up
    rho  = clip(I + KP * e, rho_min, 1)

e > 0 (the top layer holds more than the target) raises rho, towards plain VAE gradients and less
smoothing bias; e < 0 (the layer collapses) lowers it. It settles at the largest rho that keeps the
target, or at rho = 1 if the target holds there. I starts at --rho. Defaults: KP = 0.05 (an
immediate rho drop of up to 0.05 when the KL falls), KI = 1e-4 (at most 1e-4 per step: 0.5 of rho
in 5000 steps), KL_EMA = 0.99 (about 100 steps). These were checked on synthetic plants only
(tests/test_rho_control.py), not tuned on real runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HVAEError

KP = 0.05
KI = 1e-4
KL_EMA = 0.99
SCHEDULE_KINDS = ("constant", "linear", "cosine")
SCHEDULE_SYNTAX = "constant, linear:START:END:STEPS or cosine:START:END:STEPS, optionally :hold=STEPS"


@dataclass(frozen=True)
class RhoSchedule:
    """rho as a function of the step index: ``kind`` from START to END over ``steps`` after ``hold``."""

    kind: str
    start: float
    end: float
    steps: int = 0
    hold: int = 0

    def __call__(self, step: int) -> float:
        if self.kind == "constant" or step < self.hold:
            return self.start
        frac = min(1.0, (step - self.hold) / self.steps)
        w = frac if self.kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * frac))
        return self.start + (self.end - self.start) * w


def parse_schedule(spec: str, rho: float) -> RhoSchedule:
    """The RhoSchedule of a ``--rho-schedule`` string (syntax in the module docstring); ``constant``
    keeps ``rho``. Any problem is one HVAEError line that shows the syntax."""
    def bad(why: str):
        return HVAEError(f"--rho-schedule {spec!r}: {why}: pass {SCHEDULE_SYNTAX}, e.g. linear:0.5:1.0:20000:hold=5000")

    parts = spec.strip().split(":")
    kind = parts[0]
    if kind not in SCHEDULE_KINDS:
        raise bad(f"unknown kind {kind!r}")
    if kind == "constant":
        if len(parts) > 1:
            raise bad("constant takes no values (it keeps --rho)")
        return RhoSchedule("constant", rho, rho)
    hold = 0
    if len(parts) == 5:
        if not parts[4].startswith("hold="):
            raise bad(f"the fifth part must be hold=STEPS, got {parts[4]!r}")
        hold = _count(parts[4][5:], "hold", bad)
    elif len(parts) != 4:
        raise bad(f"{kind} takes START:END:STEPS")
    start, end = (_unit(s, name, bad) for s, name in ((parts[1], "START"), (parts[2], "END")))
    steps = _count(parts[3], "STEPS", bad)
    if steps < 1:
        raise bad("STEPS must be at least 1")
    return RhoSchedule(kind, start, end, steps, hold)


def _unit(s: str, name: str, bad) -> float:
    try:
        v = float(s)
    except ValueError:
        raise bad(f"{name} must be a number, got {s!r}") from None
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise bad(f"{name} must lie in [0, 1], got {s}")
    return v


def _count(s: str, name: str, bad) -> int:
    if not (s.isascii() and s.isdigit()) or len(s) > 12:
        raise bad(f"{name} must be a whole number of steps (at most 12 digits), got {s!r}")
    return int(s)


@dataclass
class RhoController:
    """The PI controller of the module docstring. ``rho`` is the value for the next step;
    ``observe(top_kl)`` (nats per example, one minibatch) updates it."""

    target: float
    rho_min: float
    integral: float  # I; starts at --rho
    rho: float = math.nan
    kl_ema: float = math.nan  # NaN until the first observation
    kp: float = KP
    ki: float = KI
    ema: float = KL_EMA

    def __post_init__(self):
        if not (self.target > 0 and 0.0 <= self.rho_min <= self.integral <= 1.0):
            raise HVAEError(f"the rho controller needs a target > 0 nats and rho_min <= rho <= 1, got target "
                            f"{self.target}, rho_min {self.rho_min}, rho {self.integral}: pass --rho-control > 0 and "
                            f"--rho >= --rho-min")
        if math.isnan(self.rho):
            self.rho = self.integral

    def __call__(self, step: int) -> float:
        """The rho of the next step (the step index is the schedules' argument; the controller needs none)."""
        return self.rho

    def observe(self, top_kl: float) -> float:
        """One step's top-layer KL (nats) -> the rho of the next step. A non-finite KL leaves everything as it was."""
        if not math.isfinite(top_kl):
            return self.rho
        self.kl_ema = top_kl if math.isnan(self.kl_ema) else self.ema * self.kl_ema + (1 - self.ema) * top_kl
        e = min(1.0, max(-1.0, (self.kl_ema - self.target) / self.target))
        self.integral = min(1.0, max(self.rho_min, self.integral + self.ki * e))
        self.rho = min(1.0, max(self.rho_min, self.integral + self.kp * e))
        return self.rho

    def state_dict(self) -> dict:
        """What changes while training, as plain floats (checkpoints load with weights_only=True);
        the gains and the target come from the config."""
        return {k: getattr(self, k) for k in STATE}

    def load_state_dict(self, st: dict) -> None:
        if not isinstance(st, dict) or set(st) != set(STATE):
            raise HVAEError(f"the checkpoint's rho-controller state {st!r} lacks one of {', '.join(STATE)}: "
                            f"resume with the version that wrote it, or start a new --out")
        for k in STATE:
            setattr(self, k, float(st[k]))


STATE = ("integral", "rho", "kl_ema")
