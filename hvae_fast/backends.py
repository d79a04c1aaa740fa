"""The contract between ``ou`` and the OU backends: the ``Backend`` record, the backend and OU
target names, the argument checks.

It imports nothing of the package but ``errors`` (and not torch). ``ou`` (which loads and chooses
the backends) and every backend (kernels/backend.py, native.py) import it, so ``ou`` can import
the backends without an import cycle; ``config`` checks its fields against it without reaching
up to ``ou``. Shapes and semantics of the two ops: see ou.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .errors import HVAEError

OU_TARGETS = ("mean-std", "ratio")
BACKEND_NAMES = ("auto", "triton", "cuda", "cpp", "torch")  # what --backend accepts


def check_ou_args(rho: float, K: int) -> None:
    """Raise HVAEError for rho outside [0, 1] or K < 1 (the CLI turns it into one line)."""
    if not (isinstance(rho, (int, float)) and 0.0 <= float(rho) <= 1.0) or math.isnan(float(rho)):
        raise HVAEError(f"rho must lie in [0, 1], got {rho!r}: pass --rho between 0 and 1 (1 = no smoothing)")
    if not (isinstance(K, int) and K >= 1):
        raise HVAEError(f"the number of OU samples K must be an integer >= 1, got {K!r}: pass --ou-samples 1 or more")


@dataclass(frozen=True)
class Backend:
    """One implementation of the two OU ops. ``probe(device)`` returns (available, reason)."""

    name: str
    correlated_samples: Callable  # (z, mu, sigma, rho, K, seed) -> [K, B, *S]
    gaussian_head_logprob: Callable  # (mean_raw, scale_raw, target, mode, min_scale) -> [B]
    correlated_noise: Callable  # (seed, K, shape, device) -> [K, *shape] float32
    probe: Callable  # (device: torch.device) -> (bool, str)
    devices: tuple = ("cpu", "cuda")
