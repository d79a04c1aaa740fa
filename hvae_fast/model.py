"""The stacked hierarchical VAE of method.md, with OU smoothing of its intermediate generator layers.

Latents z_1 (next to x) ... z_L (top), indexed 0..L-1 here.
  inference   q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})          (self.enc[0..L-1])
  generative  p(z_L) = N(0, I),  p(z_i|z_{i+1}) i < L,  p(x|z_1)  (self.gen[0..L-2], self.px)
Every Gaussian is diagonal with sigma = softplus(raw) + min_scale.

``forward(x, ou)`` returns the per-layer log-densities of one posterior sample (``Terms``); the
objectives (ELBO, IW bound, IWAE, annealing, free bits) are built from those in objectives.py.
With ``ou`` given (training only), each generator layer p(z_i|z_{i+1}) is replaced by its OU
smoothing: K correlated samples around the posterior sample z_{i+1}, one batched pass of the layer
over all K*B of them, and the averaged Gaussian head; the OU backend does the two fused ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .errors import HVAEError
from .likelihoods import make_likelihood
from .nets import MLP, ConvNet
from .ou import Backend, check_ou_args, gaussian_logprob

LOG_2PI = math.log(2 * math.pi)


@dataclass
class OUSmoothing:
    """What the training forward needs to smooth the generator layers. Built once by the trainer."""

    rho: float
    samples: int
    backend: Backend
    target: str = "mean-std"
    smooth_inference: bool = False
    recompute: bool = False  # checkpoint the K*B generator pass (memory for compute)

    def __post_init__(self):
        check_ou_args(self.rho, self.samples)

    def seed(self) -> int:
        # Drawn from torch's global RNG, so runs are reproducible and resume exactly.
        return int(torch.randint(0, 2**62, (1,)).item())


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
    """[N, 2C, ...] (or [N, 2D]) -> mu, sigma of [N, C, ...]."""
    mu, raw = out.chunk(2, dim=1)
    return mu, F.softplus(raw) + min_scale


def std_normal_logprob(z):
    return (-0.5 * LOG_2PI - 0.5 * z * z).flatten(1).sum(1)


class HierarchicalVAE(nn.Module):
    """The vanilla stacked VAE (methods vae, hvae and iwae share it; they differ in the objective)."""

    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.likelihood = make_likelihood(cfg.likelihood, n_mix=cfg.n_mix)
        C, H, W = self.image_shape
        n_out = self.likelihood.num_params(C)
        L = cfg.depth
        if L < 1:
            raise HVAEError("a model needs at least one stochastic layer")
        if cfg.arch == "mlp":
            if cfg.skip:
                raise HVAEError("skip connections (HVAE+) are implemented for the ResNet models only")
            self.latent_shapes = [(d,) for d in cfg.latent_sizes]
            hid, act = cfg.hidden_sizes, cfg.activation
            below = [self.image_shape] + self.latent_shapes[:-1]
            self.enc = nn.ModuleList(MLP(below[i], hid[i], (2 * cfg.latent_sizes[i],), act) for i in range(L))
            self.gen = nn.ModuleList(MLP(self.latent_shapes[i + 1], hid[i], (2 * cfg.latent_sizes[i],), act) for i in range(L - 1))
            self.px = MLP(self.latent_shapes[0], hid[0], (n_out, H, W), act)
        elif cfg.arch == "resnet":
            s = cfg.latent_stride
            if H % (2 * s) or W % (2 * s):
                raise HVAEError(f"image size {H}x{W} is not divisible by 2 * latent_stride = {2 * s}")
            lc, ch = cfg.latent_channels, cfg.channels
            self.latent_shapes = [(lc, H // (2 * s), W // (2 * s))] * L
            self.enc = nn.ModuleList([ConvNet(C, ch, 2 * lc, cfg.data_blocks, down=2 * s)] +
                                     [ConvNet(lc, ch, 2 * lc, cfg.blocks) for _ in range(L - 1)])
            self.gen = nn.ModuleList(ConvNet(lc, ch, 2 * lc, cfg.blocks) for _ in range(L - 1))
            self.px = ConvNet(lc, ch, n_out, cfg.data_blocks, up=2 * s)
        else:
            raise HVAEError(f"unknown architecture {cfg.arch!r}: choose mlp or resnet")

    @property
    def depth(self) -> int:
        return len(self.latent_shapes)

    # ------------------------------------------------------------------------------------------
    def encode(self, x, ou: OUSmoothing | None = None):
        """Sample the inference hierarchy: lists (z, mu, sigma, log_q), bottom to top."""
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
            z = mu + sigma * torch.randn_like(mu)
            zs.append(z), mus.append(mu), sigmas.append(sigma)
            log_q.append(gaussian_logprob(z, mu, sigma))
        return zs, mus, sigmas, log_q

    def generator_logprob(self, i: int, z_above, z, skip=None, ou: OUSmoothing | None = None, q_above=None):
        """log p(z_i | z_{i+1}) for generator layer i: [B], and the skip features it passes down.

        With ``ou``, the layer is OU-smoothed around z_above using its posterior (mu, sigma) =
        ``q_above``: one batched pass over the K*B correlated samples, then the averaged head.
        """
        gen = self.gen[i]
        if ou is None:
            out, h = gen(z_above, skip)
            mu, sigma = split_gaussian(out, self.cfg.min_scale)
            return gaussian_logprob(z, mu, sigma), h
        K, B = ou.samples, z.shape[0]
        zp = ou.backend.correlated_samples(z_above, q_above[0], q_above[1], ou.rho, K, ou.seed())
        if skip is not None:
            skip = skip.unsqueeze(0).expand(K, *skip.shape).flatten(0, 1)
        if ou.recompute and torch.is_grad_enabled():
            # Keep only the K*B inputs; the layer's activations are rebuilt in backward.
            out, h = checkpoint(gen, zp.flatten(0, 1), skip, use_reentrant=False, preserve_rng_state=False)
        else:
            out, h = gen(zp.flatten(0, 1), skip)
        out = out.view(K, B, *out.shape[1:])
        mean_raw, scale_raw = out.chunk(2, dim=2)
        lp = ou.backend.gaussian_head_logprob(mean_raw, scale_raw, z, ou.target, self.cfg.min_scale)
        # The skip feature passed down is the OU average of this layer's features.
        return lp, h.view(K, B, *h.shape[1:]).mean(0)

    def forward(self, x, ou: OUSmoothing | None = None) -> Terms:
        """x: [B, C, H, W] model input (binary, or in [-1, 1]). ou: smoothing, training only."""
        zs, mus, sigmas, log_q = self.encode(x, ou)
        L = self.depth
        log_p = [None] * L
        log_p[L - 1] = std_normal_logprob(zs[L - 1])
        skip = None
        for i in reversed(range(L - 1)):
            lp, h = self.generator_logprob(i, zs[i + 1], zs[i], skip, ou, (mus[i + 1], sigmas[i + 1]))
            log_p[i] = lp
            skip = h if self.cfg.skip else None
        params, _ = self.px(zs[0], skip)
        return Terms(self.likelihood.logprob(params, x), log_q, log_p, mus)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True):
        """n images from the generative model: [n, C, H, W] in the data range."""
        dev = next(self.parameters()).device
        z = torch.randn((n, *self.latent_shapes[-1]), generator=generator, device=dev)
        skip = None
        for i in reversed(range(self.depth - 1)):
            out, h = self.gen[i](z, skip)
            mu, sigma = split_gaussian(out, self.cfg.min_scale)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=dev)
            skip = h if self.cfg.skip else None
        params, _ = self.px(z, skip)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(method: str, cfg: ModelConfig, image_shape) -> nn.Module:
    """The model for ``method``: the vanilla stack for vae/hvae/iwae; LVAE and BIVA their own."""
    if method in ("vae", "hvae", "iwae"):
        return HierarchicalVAE(cfg, image_shape)
    if method in ("lvae", "biva"):
        try:
            from . import baselines
        except ImportError as exc:
            raise HVAEError(f"method {method!r} is not available in this build: {exc}") from exc
        return baselines.build(method, cfg, image_shape)
    raise HVAEError(f"unknown method {method!r}: choose vae, hvae, iwae, lvae or biva")
