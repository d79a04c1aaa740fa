"""The stacked hierarchical VAE of method.md, with OU smoothing of its intermediate generator layers.

Latents z_1 (next to x) ... z_L (top), indexed 0..L-1 here.
  inference   q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})          (self.enc[0..L-1])
  generative  p(z_L) = N(0, I),  p(z_i|z_{i+1}) i < L,  p(x|z_1)  (self.gen[0..L-2], self.px)
Every Gaussian is diagonal with sigma = softplus(raw) + min_scale.

``forward(x, ou)`` returns the per-layer log-densities of one posterior sample (``Terms``); the
objectives (ELBO, IW bound, IWAE, annealing, free bits) are built from those in objectives.py.
With ``ou`` given (training only), each generator layer p(z_i|z_{i+1}) is replaced by its OU
smoothing: K correlated samples around the posterior sample z_{i+1}, one batched pass of the layer
over all K*B of them, and the averaged Gaussian head (HVAE+'s skipped latents are not smoothed),
by ``smoothing.smoothed_logprob``, the helper the ladders use too; the OU backend (an
``ou.get_backend`` result the trainer passes in) does the two fused ops, so the model never imports
``ou``. ``forward(x, ou, k)`` draws k posterior samples per example (IWAE).

Also the model registry: ``MODELS`` maps every method to its class (vae, hvae and iwae share
``HierarchicalVAE``; lvae and biva are in baselines.py, ladder in ladder.py) and ``build_model`` is the one entry point.
Imports run down: model -> baselines -> smoothing, stack (the shared base) -> distributions (Terms,
Gaussians).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baselines import BIVA, LadderVAE
from .ladder import TopDownLadder
from ..config import ModelConfig
from ..distributions import Terms, gaussian_logprob, normal_like, repeat_batch, split_gaussian, std_normal_logprob
from ..errors import HVAEError
from .smoothing import OUSmoothing, smoothed_logprob
from .stack import StackedVAE

__all__ = ["OUSmoothing", "HierarchicalVAE", "MODELS", "build_model", "count_parameters"]


class HierarchicalVAE(StackedVAE):
    """The vanilla stacked VAE (methods vae, hvae and iwae share it; they differ in the objective).

    HVAE+ (``cfg.skip``): stochastic skip connections, wired as LVAE+ (BIVA paper): generator layer
    p(z_i | z_{>i}) reads [z_{i+1}, z_{i+2}, ..., z_L] and p(x | z_{>=1}) reads [z_1, ..., z_L],
    concatenated along dim 1 (units for MLPs, channels for ResNets: every latent has the same
    spatial size). OU smoothing acts on the layer's own input z_{i+1} only; the skipped latents
    are the posterior samples, unsmoothed, in training as in evaluation.
    """

    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)
        L, zc = self.depth, [s[0] for s in self.z_shapes]
        below = [self.image_shape] + self.z_shapes[:-1]
        self.enc = nn.ModuleList(self.net(below[i], i, 2 * zc[i], "in" if i == 0 else "") for i in range(L))
        self.gen = nn.ModuleList(self.net(self._reads(i + 1), i, 2 * zc[i]) for i in range(L - 1))
        self.px = self.net(self._reads(0), 0, self.n_out, "out")

    def _reads(self, j: int):
        """Per-example input shape of the net that reads latent j: z_j, or with skips [z_j, ..., z_L]."""
        shapes = self.z_shapes[j:] if self.cfg.skip else self.z_shapes[j:j + 1]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def _with_skips(self, z, above):
        return torch.cat([z, *above], 1) if above else z

    def prior(self, i: int, z_above, above=None):
        """``above``: HVAE+'s latents above z_above (top last), else None; passes [z_above, *above] down."""
        out = self.gen[i](self._with_skips(z_above, above))[0]
        return split_gaussian(out, self.cfg.min_scale), ([z_above, *(above or [])] if self.cfg.skip else None)

    def decode(self, z, above=None):
        return self.px(self._with_skips(z, above))[0]

    # ------------------------------------------------------------------------------------------
    def encode(self, x, ou: OUSmoothing | None = None, k: int = 1):
        """Sample the inference hierarchy, k samples per example of x [B, ...]: lists (z, mu, sigma,
        log_q) of [k * B, ...] (sample-major), bottom to top. q(z_1|x)'s net runs once on the B rows."""
        zs, mus, sigmas, log_q = [], [], [], []
        for i, enc in enumerate(self.enc):
            if i > 0 and ou is not None and ou.smooth_inference:
                # Optional (off by default): smooth q(z_{i+1}|z_i) the same way, averaging in torch.
                K = ou.samples
                zp = ou.backend.correlated_samples(zs[-1], mus[-1], sigmas[-1], ou.rho, K, ou.seed())
                out = enc(zp.flatten(0, 1))[0]
                mu_k, raw = out.view(K, -1, *out.shape[1:]).chunk(2, dim=2)
                sigma_k = F.softplus(raw) + self.cfg.min_scale
                sigma = sigma_k.mean(0)
                mu = mu_k.mean(0) if ou.target == "mean-std" else sigma * (mu_k / sigma_k).mean(0)
            else:
                mu, sigma = split_gaussian(enc(x if i == 0 else zs[-1])[0], self.cfg.min_scale)
                if i == 0 and k > 1:
                    mu, sigma = repeat_batch(mu, k), repeat_batch(sigma, k)
            z = mu + sigma * normal_like(mu)
            zs.append(z), mus.append(mu), sigmas.append(sigma)
            log_q.append(gaussian_logprob(z, mu, sigma))
        return zs, mus, sigmas, log_q

    def generator_logprob(self, i: int, z_above, z, above=None, ou: OUSmoothing | None = None, q_above=None):
        """log p(z_i | z_{i+1}, and with skips the latents ``above`` it): [B].

        With ``ou``, the layer is OU-smoothed around z_above using its posterior (mu, sigma) =
        ``q_above``: one batched pass over the K*B correlated samples, then the averaged head.
        """
        if ou is None:
            (mu, sigma), _ = self.prior(i, z_above, above)
            return gaussian_logprob(z, mu, sigma)
        # Only the layer's own input is smoothed; the skips carry the posterior samples as they are.
        skips = (torch.cat(above, 1),) if above else ()
        return smoothed_logprob(ou, partial(self.generator_head, i), z_above, q_above, z, self.cfg.min_scale, skips)

    def generator_head(self, i: int, z_above, *skips):
        return self.gen[i](torch.cat([z_above, *skips], 1))[0].chunk(2, dim=1)

    def generator_inputs(self, x) -> list:
        zs, mus, sigmas, _ = self.encode(x)
        return [(i, zs[i + 1], (mus[i + 1], sigmas[i + 1]), zs[i], (torch.cat(zs[i + 2:], 1),) if self.cfg.skip
                 and i + 2 < self.depth else ()) for i in reversed(range(self.depth - 1))]

    def generator_parameters(self, i: int) -> list:
        return list(self.gen[i].parameters())

    def forward(self, x, ou: OUSmoothing | None = None, k: int = 1) -> Terms:
        """x: [B, C, H, W] model input (binary, or in [-1, 1]); ou: smoothing, training only; k:
        posterior samples per example. Terms of [k * B], sample-major."""
        zs, mus, sigmas, log_q = self.encode(x, ou, k)
        L = self.depth
        log_p = [None] * L
        log_p[L - 1] = std_normal_logprob(zs[L - 1])
        for i in reversed(range(L - 1)):
            above = zs[i + 2:] if self.cfg.skip else None
            log_p[i] = self.generator_logprob(i, zs[i + 1], zs[i], above, ou, (mus[i + 1], sigmas[i + 1]))
        params = self.decode(zs[0], zs[1:] if self.cfg.skip else None)
        return Terms(self.likelihood.logprob(params, repeat_batch(x, k) if k > 1 else x), log_q, log_p, mus)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MODELS = {"vae": HierarchicalVAE, "hvae": HierarchicalVAE, "iwae": HierarchicalVAE, "lvae": LadderVAE, "biva": BIVA,
          "ladder": TopDownLadder}


def build_model(method: str, cfg: ModelConfig, image_shape) -> nn.Module:
    """The model for ``method`` on images of ``image_shape`` (C, H, W): the vanilla stack for
    vae/hvae/iwae (they differ in the objective), LadderVAE for lvae, BIVA for biva, TopDownLadder
    (the VDVAE-style ladder, ladder.py) for ladder."""
    if method not in MODELS:
        raise HVAEError(f"unknown method {method!r}: choose one of {', '.join(MODELS)}")
    return MODELS[method](cfg, image_shape)
