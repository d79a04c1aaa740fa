"""A hand-written eager PyTorch peer of the MLP presets: the code a researcher would write in an
afternoon, with the project's shapes, objective and optimizer, and nothing else.

The stacked VAE of ``mnist-mlp-40x4``-like presets: per stochastic layer an encoder MLP (2 tanh layers)
and, for every layer but the top, a generator MLP; a Bernoulli decoder. ``rho < 1`` smooths each
intermediate generator layer as the project does (mean-std target): K correlated samples of z_{i+1}
around its posterior sample, one pass over the K*B rows, the log-density of z_i under the K-averaged
mean and scale. The step is the trainer's: loss, zero_grad, backward, clip_grad_norm_, Adam.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG2PI = math.log(2 * math.pi)


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, o))


def gauss(z, mu, sigma):  # [B, D] -> [B]
    return (-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * LOG2PI).sum(1)


class PeerVAE(nn.Module):
    def __init__(self, x_dim: int, latents, hidden, rho: float = 1.0, K: int = 5, min_scale: float = 1e-3):
        super().__init__()
        dims = [x_dim, *latents]
        self.enc = nn.ModuleList(mlp(dims[i], hidden[i], 2 * latents[i]) for i in range(len(latents)))
        self.gen = nn.ModuleList(mlp(latents[i + 1], hidden[i], 2 * latents[i]) for i in range(len(latents) - 1))
        self.dec = mlp(latents[0], hidden[0], x_dim)
        self.rho, self.K, self.min_scale = rho, K, min_scale

    def split(self, out):
        mu, raw = out.chunk(2, 1)
        return mu, F.softplus(raw) + self.min_scale

    def loss(self, x):  # negative ELBO (OU-smoothed when rho < 1), mean over the batch
        h, zs, qs, log_q = x, [], [], 0.0
        for enc in self.enc:
            mu, sigma = self.split(enc(h))
            h = mu + sigma * torch.randn_like(mu)
            zs.append(h), qs.append((mu, sigma))
            log_q = log_q + gauss(h, mu, sigma)
        log_p = (-0.5 * zs[-1] ** 2 - 0.5 * LOG2PI).sum(1)
        for i, gen in enumerate(self.gen):
            z_above, (mu_a, sig_a) = zs[i + 1], qs[i + 1]
            if self.rho < 1.0:
                K, B = self.K, z_above.shape[0]
                eps = torch.randn(K, *z_above.shape)
                zp = self.rho * z_above + (1 - self.rho) * mu_a + sig_a * math.sqrt(1 - self.rho ** 2) * eps
                mean_raw, scale_raw = gen(zp.flatten(0, 1)).view(K, B, -1).chunk(2, 2)
                mu, sigma = mean_raw.mean(0), (F.softplus(scale_raw) + self.min_scale).mean(0)
            else:
                mu, sigma = self.split(gen(z_above))
            log_p = log_p + gauss(zs[i], mu, sigma)
        logits = self.dec(zs[0])
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        return -(log_px + log_p - log_q).mean()


class PeerStep:
    """The peer's whole training step, eager or under ``torch.compile`` (forward, backward and optimizer)."""

    def __init__(self, cfg, x: torch.Tensor, hvae: bool, compiled: bool = False):
        torch.manual_seed(0)
        m = cfg.model
        self.model = PeerVAE(x[0].numel(), list(m.latent_sizes), list(m.hidden_sizes),
                             cfg.ou.rho if hvae else 1.0, cfg.ou.samples, m.min_scale)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        self.x = x.flatten(1)
        self.step = torch.compile(self._step) if compiled else self._step

    def _step(self):
        loss = self.model.loss(self.x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss
