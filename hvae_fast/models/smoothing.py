"""OU smoothing of one generator layer: the one helper the stacked VAE and the ladders (LVAE, BIVA,
the VDVAE-style ladder) share, and the loop over a ladder's generator layers (smooth_ladder_layers).

A generator layer maps the posterior sample z_{i+1} it reads (and, in some models, context the
layer also reads: HVAE+'s skipped latents, a ladder's top-down state) to the Gaussian head of
p(z_i | .). Smoothed (training only), log p(z_i | .) becomes the log-density of z_i under the
K-averaged head over K correlated samples

    z'_k = rho z_{i+1} + (1 - rho) mu_{i+1} + sigma_{i+1} sqrt(1 - rho^2) eps_k,   k = 1..K,

(mu_{i+1}, sigma_{i+1}) the posterior that drew z_{i+1}; the context is passed as it is (the
posterior samples), repeated for every k. The OU backend does the two fused ops
(``correlated_samples``, ``gaussian_head_logprob``); the models never import ``ou``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import HVAEError
from ..ops.backends import Backend, check_ou_args


@dataclass
class OUSmoothing:
    """What the training forward needs to smooth the generator layers. Built once by the trainer."""

    rho: float
    samples: int
    backend: Backend
    target: str = "mean-std"
    smooth_inference: bool = False  # the stacked VAE only: also smooth q(z_{i+1} | z_i)
    recompute: bool = False  # checkpoint the K*B generator pass (memory for compute)

    def __post_init__(self):
        check_ou_args(self.rho, self.samples)

    def seed(self) -> int:
        # Drawn from torch's global RNG, so runs are reproducible and resume exactly.
        return int(torch.randint(0, 2**62, (1,)).item())


def check_ladder_ou(ou: OUSmoothing | None, name: str) -> None:
    """A ladder smooths its generator layers only: its posterior shares the top-down pass, so the
    stacked VAE's optional inference smoothing has no meaning there."""
    if ou is not None and ou.smooth_inference:
        raise HVAEError(f"--ou-inference smooths the stacked VAE's inference network; {name}'s posterior shares "
                        f"its top-down pass, which is not smoothed: drop --ou-inference")


def smoothed_logprob(ou: OUSmoothing, block: Callable, z_above, q_above, z, min_scale: float, context=()):
    """log p(z | z_above, context) under the K-averaged Gaussian head: [B].

    z_above [B, *S]: the posterior sample the layer reads; q_above = (mu, sigma), each [B, *S]: the
    posterior that drew it; z [B, *T]: the latent whose density is taken; context: tensors [B, ...]
    the block also reads, unsmoothed. ``block(z' [K*B, *S], *context [K*B, ...])`` returns the head's
    (mean_raw, scale_raw), each [K*B, *T], rows k-major (row k*B + b is sample k of example b).
    With ``ou.recompute`` (and grad enabled) only z' and the B-row context are kept for backward;
    the block's activations are rebuilt there.
    """
    K, B = ou.samples, z.shape[0]
    zp = ou.backend.correlated_samples(z_above, q_above[0], q_above[1], ou.rho, K, ou.seed()).flatten(0, 1)

    def run(zp, *ctx):
        # The context is repeated inside, so a recomputing pass saves it once, not K times.
        return block(zp, *(c.unsqueeze(0).expand(K, *c.shape).flatten(0, 1) for c in ctx))

    if ou.recompute and torch.is_grad_enabled():
        mean_raw, scale_raw = checkpoint(run, zp, *context, use_reentrant=False, preserve_rng_state=False)
    else:
        mean_raw, scale_raw = run(zp, *context)
    return ou.backend.gaussian_head_logprob(mean_raw.unflatten(0, (K, B)), scale_raw.unflatten(0, (K, B)), z,
                                            ou.target, min_scale)


def smooth_ladder_layers(ou: OUSmoothing, terms, layers, generator_head: Callable, min_scale: float):
    """A ladder's ``terms`` with each generator layer's log p replaced by ``smoothed_logprob``.
    ``layers``: what its top-down pass recorded per generator layer, (i, z_{i+1}, (mu, sigma) of the
    posterior that drew z_{i+1}, z_i, the unsmoothed state the layer reads); ``generator_head(i, z',
    *state)``: that layer's block. Runs after the pass, so the OU seeds follow every posterior draw."""
    for i, z_above, q_above, z, state in layers:
        terms.log_p[i] = smoothed_logprob(ou, partial(generator_head, i), z_above, q_above, z, min_scale, state)
    return terms
