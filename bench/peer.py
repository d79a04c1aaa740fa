"""A hand-written eager PyTorch peer of the stacked presets: the code a researcher would write in an
afternoon, with the project's shapes, objective and optimizer, and nothing else.

The stacked VAE: per stochastic layer an encoder net and, for every layer but the top, a generator
net; a likelihood head on z_1. MLP presets (``mnist-mlp-40x4``): 2 tanh layers per net, a Bernoulli
head. ResNet presets (``cifar10-resnet-4``): per net a 3x3 stem conv (stride 2 on the image), ELU
residual blocks, a 3x3 head conv; the decoder upsamples with a stride-2 transposed conv and ends in
a discretized mixture of logistics with RGB coupling (written out below, PixelCNN++'s form).
``rho < 1`` smooths each intermediate generator layer as the project does (mean-std target): K
correlated samples of z_{i+1} around its posterior sample, one pass over the K*B rows, the
log-density of z_i under the K-averaged mean and scale. The step is the trainer's: loss, zero_grad,
backward, clip_grad_norm_, the preset's optimizer (Adam or Adamax at torch's defaults).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG2PI = math.log(2 * math.pi)


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(i, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, o))


class Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.elu(self.c1(F.elu(x))))


def convnet(cin: int, ch: int, cout: int, blocks: int, down=False, up=False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, ch, 3, padding=1, stride=2 if down else 1), *(Res(ch) for _ in range(blocks))]
    if up:
        layers += [nn.ELU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
    return nn.Sequential(*layers, nn.ELU(), nn.Conv2d(ch, cout, 3, padding=1))


def gauss(z, mu, sigma):  # [B, ...] -> [B]
    return (-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * LOG2PI).flatten(1).sum(1)


def dmol(params, x, M: int):
    """log p(x), [B]: x [B, 3, H, W] on the 256 levels of [-1, 1]; params [B, 10 M, H, W]."""
    B, _, H, W = x.shape
    logit, p = params[:, :M], params[:, M:].view(B, 9, M, H, W)
    mu, log_s, coef = p[:, 0:3], p[:, 3:6].clamp(min=-7.0), torch.tanh(p[:, 6:9])
    x = x.unsqueeze(2)  # [B, 3, 1, H, W]
    mean = torch.stack([mu[:, 0], mu[:, 1] + coef[:, 0] * x[:, 0],
                        mu[:, 2] + coef[:, 1] * x[:, 0] + coef[:, 2] * x[:, 1]], 1)
    c, inv = x - mean, torch.exp(-log_s)
    plus, minus = inv * (c + 1 / 255), inv * (c - 1 / 255)
    mass = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv * c
    lp = torch.where(x < -0.999, plus - F.softplus(plus), torch.where(
        x > 0.999, -F.softplus(minus), torch.where(
            mass > 1e-5, mass.clamp(min=1e-12).log(), mid - log_s - 2 * F.softplus(mid) - math.log(127.5))))
    return torch.logsumexp(lp.sum(1) + F.log_softmax(logit, 1), 1).sum((1, 2))


class PeerVAE(nn.Module):
    def __init__(self, cfg, image_shape, rho: float = 1.0, K: int = 5):
        super().__init__()
        m, (C, H, W) = cfg.model, image_shape
        L = m.depth
        if m.arch == "mlp":
            dims = [C * H * W, *m.latent_sizes]
            self.enc = nn.ModuleList(mlp(dims[i], m.hidden_sizes[i], 2 * dims[i + 1]) for i in range(L))
            self.gen = nn.ModuleList(mlp(dims[i + 2], m.hidden_sizes[i], 2 * dims[i + 1]) for i in range(L - 1))
            self.dec = mlp(dims[1], m.hidden_sizes[0], C * H * W)
        else:
            z, ch = m.latent_channels, m.channels
            self.enc = nn.ModuleList([convnet(C, ch, 2 * z, m.data_blocks, down=True)]
                                     + [convnet(z, ch, 2 * z, m.blocks) for _ in range(L - 1)])
            self.gen = nn.ModuleList(convnet(z, ch, 2 * z, m.blocks) for _ in range(L - 1))
            self.dec = convnet(z, ch, 10 * m.n_mix, m.data_blocks, up=True)
        self.bernoulli, self.n_mix = m.likelihood == "bernoulli", m.n_mix
        self.rho, self.K, self.min_scale = rho, K, m.min_scale

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
        log_p = (-0.5 * zs[-1] ** 2 - 0.5 * LOG2PI).flatten(1).sum(1)
        for i, gen in enumerate(self.gen):
            z_above, (mu_a, sig_a) = zs[i + 1], qs[i + 1]
            if self.rho < 1.0:
                K, B = self.K, z_above.shape[0]
                eps = torch.randn(K, *z_above.shape, device=z_above.device)
                zp = self.rho * z_above + (1 - self.rho) * mu_a + sig_a * math.sqrt(1 - self.rho ** 2) * eps
                mean_raw, scale_raw = gen(zp.flatten(0, 1)).view(K, B, -1, *z_above.shape[2:]).chunk(2, 2)
                mu, sigma = mean_raw.mean(0), (F.softplus(scale_raw) + self.min_scale).mean(0)
            else:
                mu, sigma = self.split(gen(z_above))
            log_p = log_p + gauss(zs[i], mu, sigma)
        out = self.dec(zs[0])
        if self.bernoulli:
            log_px = -F.binary_cross_entropy_with_logits(out, x.flatten(1), reduction="none").sum(1)
        else:
            log_px = dmol(out, x, self.n_mix)
        return -(log_px + log_p - log_q).mean()


class PeerStep:
    """The peer's whole training step, eager or under ``torch.compile`` (forward, backward and optimizer)."""

    def __init__(self, cfg, x: torch.Tensor, hvae: bool, compiled: bool = False):
        torch.manual_seed(0)
        self.model = PeerVAE(cfg, tuple(x.shape[1:]), cfg.ou.rho if hvae else 1.0, cfg.ou.samples).to(x.device)
        t = cfg.train
        self.opt = (torch.optim.Adamax if t.optimizer == "adamax" else torch.optim.Adam)(self.model.parameters(), lr=t.lr)
        self.clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        self.x = x
        # dynamic=False: every PeerStep compiles the same code object, so a second preset or variant in
        # one process would otherwise recompile with symbolic shapes, which inductor's convolution
        # lowering cannot always decide (torch 2.13: "cannot determine truth value of Relational").
        self.step = torch.compile(self._step, dynamic=False) if compiled else self._step

    def _step(self):
        loss = self.model.loss(self.x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss
