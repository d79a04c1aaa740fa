"""Objectives built from a model's per-layer terms: ELBO, importance-weighted bounds, KL annealing
and free bits. All quantities are in nats per example unless a name says otherwise."""

from __future__ import annotations

import math

import torch

from ..config import OU_METHODS
from ..distributions import repeat_batch  # noqa: F401  (evaluate.py repeats batches with it too)
from ..errors import HVAEError


def kl_weight(step: int, zero_steps: int, ramp_steps: int) -> float:
    """KL annealing: 0 for the first ``zero_steps`` steps, then linear to 1 over ``ramp_steps``."""
    if step < zero_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - zero_steps) / ramp_steps)


def free_bits_kl(kl_layers: list, floor: float, global_mean=None) -> list:
    """Free bits: each layer's KL, averaged over the minibatch, clamped from below at ``floor`` nats.

    Below the floor the clamp is constant, so that layer's KL gets no gradient (Kingma et al. 2016).
    Under data parallelism pass ``global_mean`` (a [L] tensor -> its mean over the processes): each
    process holds a shard of the batch, and the clamp must decide on the whole batch's mean. A layer
    above the floor then keeps its shard's mean (whose gradients DDP averages into the whole batch's),
    one below it gets the constant floor, as in one process. Returns one scalar per layer.
    """
    means = [kl.mean() for kl in kl_layers]
    if floor <= 0:
        return means
    if global_mean is None:
        return [torch.clamp(m, min=floor) for m in means]
    above = global_mean(torch.stack([m.detach() for m in means])) > floor
    return [torch.where(a, m, torch.full_like(m, floor)) for m, a in zip(means, above)]


def elbo(terms) -> torch.Tensor:
    """The evidence lower bound of one posterior sample: [B]."""
    return terms.log_weight


def elbo_loss(terms, beta: float = 1.0, free_bits: float = 0.0, global_mean=None):
    """Negative (annealed, free-bits) ELBO averaged over the batch, and the unweighted ELBO [B];
    ``global_mean`` as in free_bits_kl."""
    kls = free_bits_kl(terms.kl, free_bits, global_mean)
    loss = -terms.log_px.mean() + beta * sum(kls)
    return loss, elbo(terms)


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``, numerically stable."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def iw_log_weights(model, x, k: int, ou=None, beta: float = 1.0) -> torch.Tensor:
    """Log importance weights of k posterior samples per example: [k, B].

    ``beta`` < 1 anneals the latent part: log p(x|z) + beta (log p(z) - log q(z|x)).
    The model draws the k samples itself (``forward(x, ou, k)``): the vanilla stack runs the
    deterministic part of q(z_1|x) once per example, not on k copies of x.
    """
    t = model(x, ou, k)
    lw = t.log_px + beta * (sum(t.log_p) - sum(t.log_q))
    return lw.view(k, x.shape[0])


def iwae_loss(model, x, k: int, beta: float = 1.0):
    """The k-sample IWAE training objective (Burda et al. 2016); k = 1 is the ELBO."""
    lw = iw_log_weights(model, x, k, beta=beta)
    bound = log_mean_exp(lw, 0)
    return -bound.mean(), bound


@torch.no_grad()
def iw_bound(model, x, n_samples: int, chunk: int = 500) -> torch.Tensor:
    """The importance-weighted bound log (1/L) sum_l w_l with L = n_samples: [B] nats.

    Samples are drawn ``chunk`` per example at a time and combined with a running logsumexp,
    so L = 5000 costs the memory of ``chunk`` samples.
    """
    if n_samples < 1:
        raise HVAEError(f"--iw-samples must be >= 1, got {n_samples}")
    acc = None
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        lse = torch.logsumexp(iw_log_weights(model, x, k).double(), 0)
        acc = lse if acc is None else torch.logaddexp(acc, lse)
        done += k
    return (acc - math.log(n_samples)).float()


def training_loss(model, x, method: str, ou, beta: float, free_bits: float, iw_k: int, global_mean=None):
    """The loss the optimizer minimises for ``method``, and the per-example bound it came from.

    vae: ELBO; hvae / lvae / biva (OU_METHODS): ELBO, with OU-smoothed generator layers when ``ou`` is
    given; iwae: k-sample bound.
    ``global_mean``: the mean over data-parallel processes, for free bits (see free_bits_kl).
    """
    if method == "iwae":
        if free_bits > 0:
            raise HVAEError("--free-bits is defined for the ELBO's per-layer KL terms, not for the IWAE objective")
        return iwae_loss(model, x, iw_k, beta)
    terms = model(x, ou if method in OU_METHODS else None)
    return elbo_loss(terms, beta, free_bits, global_mean)
