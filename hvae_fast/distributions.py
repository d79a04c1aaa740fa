"""What every model shares: the per-layer log-densities (``Terms``) and the diagonal-Gaussian helpers.

The bottom of the model code: it imports nothing of the package, so ``ou``, the vanilla stack,
LVAE and BIVA all take these from here. Log-densities are in nats, summed over every
non-batch dimension: one number per example, ``[B]``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is float16/bfloat16 (a net's output under autocast), else as it is.

    Every log-density and every Gaussian's (mu, sigma) is computed from fp32(inputs): under
    ``--precision bf16/fp16`` the nets run in low precision, but the likelihood, the KL terms and the
    latent samples (z = mu + sigma eps, the next layer's input) stay float32, where a bf16 ELBO
    (8 mantissa bits: ~0.4% of -100 nats) would drown the differences training follows."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class Terms:
    """Log-densities of one posterior sample per example; every tensor is [B] (nats).

    ``log_q[i]`` = log q(z_i | below), ``log_p[i]`` = log p(z_i | above) (the prior for the top),
    bottom to top; ``q_mean[i]`` is the posterior mean of z_i given the sampled layers below it.
    """

    log_px: torch.Tensor
    log_q: list
    log_p: list
    q_mean: list = field(default_factory=list)

    @property
    def kl(self) -> list:
        """Per-layer single-sample KL estimates log q - log p, bottom to top: list of [B]."""
        return [q - p for q, p in zip(self.log_q, self.log_p)]

    @property
    def log_weight(self) -> torch.Tensor:
        """log p(x, z) - log q(z | x): [B]."""
        return self.log_px + sum(self.log_p) - sum(self.log_q)


def split_gaussian(out: torch.Tensor, min_scale: float):
    """A net's Gaussian head [N, 2C, ...] (or [N, 2D]) -> mu, sigma = softplus(raw) + min_scale, each [N, C, ...]."""
    mu, raw = fp32(out).chunk(2, dim=1)
    return mu, F.softplus(raw) + min_scale


def gaussian_logprob(x, mu, sigma):
    """log N(x | mu, sigma^2) summed over all but the batch dimension: [B]."""
    x, mu, sigma = fp32(x), fp32(mu), fp32(sigma)
    lp = -0.5 * LOG_2PI - torch.log(sigma) - 0.5 * ((x - mu) / sigma) ** 2
    return lp.flatten(1).sum(1)


def std_normal_logprob(z):
    """log N(z | 0, I) summed over all but the batch dimension: [B]."""
    z = fp32(z)
    return (-0.5 * LOG_2PI - 0.5 * z * z).flatten(1).sum(1)


# The rows of a batch split across data-parallel processes that this one holds: (first row, rows,
# rows of the whole batch), or None. Set by distributed.py around a training forward.
_BATCH_SHARD = None


@contextlib.contextmanager
def batch_shard(first: int, rows: int, total: int):
    """Within: ``normal_like`` draws the noise of the whole batch of ``total`` rows and keeps this
    process's ``rows`` from ``first``, so the noise does not depend on how the batch is split."""
    global _BATCH_SHARD
    prev, _BATCH_SHARD = _BATCH_SHARD, (first, rows, total)
    try:
        yield
    finally:
        _BATCH_SHARD = prev


def normal_like(mu: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like mu [k * b, ...] (sample-major), from torch's RNG; inside
    ``batch_shard`` the rows of draws for the whole [k, total, ...] batch."""
    if _BATCH_SHARD is None:
        return torch.randn_like(mu)
    first, rows, total = _BATCH_SHARD
    k = mu.shape[0] // rows
    eps = torch.randn((k, total, *mu.shape[1:]), dtype=mu.dtype, device=mu.device)
    return eps[:, first:first + rows].reshape(mu.shape)


def repeat_batch(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, ...] -> [k * B, ...], sample-major, so results view as [k, B]."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
