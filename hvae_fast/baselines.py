"""Baselines of the paper's Tables 2, 5 and 6: the Ladder VAE and BIVA.

Both return the same ``Terms`` as ``HierarchicalVAE`` (per stochastic layer, bottom to top: log q of
the sampled z under the posterior actually sampled from, log p under the generative model), so the
trainer, the objectives (ELBO, IW bound, IWAE, annealing, free bits) and the evaluation run on them
unchanged. OU smoothing is defined for the vanilla stack only: ``forward(x, ou)`` with ``ou`` given
raises HVAEError. Both work for ``arch="mlp"`` (nets.MLP) and ``arch="resnet"`` (nets.ConvNet)
configs; every net returns (Gaussian parameters, the features before its head).

Ladder VAE (Sonderby et al. 2016), layers i = 1..L (z_1 next to x)
    bottom-up   d_1 = f_1(x), d_i = f_i(d_{i-1});  (mu_hat_i, sigma_hat_i) = head_i(d_i)
    top-down    z_L ~ q = N(mu_hat_L, sigma_hat_L^2)
                for i < L: (mu_p, sigma_p) = gen_i(z_{i+1})   -- the generative layer p(z_i|z_{i+1}),
                the same one sampling uses (the generative path is shared)
                sigma_q^2 = 1 / (sigma_hat^-2 + sigma_p^-2),  mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2
                z_i ~ N(mu_q, sigma_q^2)
    The generative model is exactly the vanilla stack's; log q uses the merged (mu_q, sigma_q).

BIVA (Maaloe et al. 2019), simplified. Layers i < L hold two latents z_i = (z_i^BU, z_i^TD) of the
same shape (counted as one stochastic layer in ``Terms``: log densities summed, ``q_mean`` and
``latent_shapes`` concatenated along dim 1, BU first); the top layer holds one, z_L.
    generative  h_L-1 = g_{L-1}(z_L);  h_i = g_i([z_{i+1}, h_{i+1}]) for i < L-1  (deterministic
                top-down path: the skip connections, so p(z_i | z_{>i}) sees every layer above)
                p(z_i^BU | z_{>i}) p(z_i^TD | z_{>i}) = two diagonal Gaussians from g_i's head
                p(x | z) = px([z_1, h_1])
    inference   bottom-up, stochastic:  d_1 = b_1(x), q(z_1^BU | x) from b_1's head;
                d_i = b_i([d_{i-1}, z_{i-1}^BU]), q(z_i^BU | x, z^BU_{<i}) from b_i's head (i < L);
                q(z_L | x, z^BU_{<L}) from b_L's head
                top-down: q(z_i^TD | x, z^BU_{<i}, z_{>i}) = t_i([h_i, d_i]), where h_i is the
                generative top-down path evaluated on the posterior samples (shared parameters)
    [a, b] is concatenation along dim 1 (features for MLPs, channels for ResNets).
  Simplifications against the paper: every latent of one model has the same spatial size (no
  per-layer strides); the generative BU and TD factors of one layer are conditionally independent
  given z_{>i}; the TD posterior is a direct Gaussian head (no precision weighting); no weight
  normalisation, gated ResNet blocks, dropout or data-dependent init: the blocks are nets.py's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import HVAEError
from .likelihoods import make_likelihood
from .model import Terms, split_gaussian, std_normal_logprob
from .nets import MLP, ConvNet
from .ou import gaussian_logprob


def precision_weighted(mu_hat, sigma_hat, mu_p, sigma_p):
    """Merge two Gaussians by precision weighting (LVAE, eq. 18-19 of Sonderby et al.): mu_q, sigma_q."""
    prec_hat, prec_p = sigma_hat.pow(-2), sigma_p.pow(-2)
    var_q = 1.0 / (prec_hat + prec_p)
    return (mu_hat * prec_hat + mu_p * prec_p) * var_q, var_q.sqrt()


def _cat_shape(a, b):
    """Shape of torch.cat([A, B], 1) for per-example shapes a, b."""
    return (a[0] + b[0], *a[1:])


class _Stack(nn.Module):
    """Shared plumbing: likelihood, shapes, and a net factory for MLP / ResNet configs."""

    def _setup(self, cfg: ModelConfig, image_shape):
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.likelihood = make_likelihood(cfg.likelihood, n_mix=cfg.n_mix)
        C, H, W = self.image_shape
        self.n_out = self.likelihood.num_params(C)
        L = cfg.depth
        if L < 1:
            raise HVAEError("a model needs at least one stochastic layer")
        if cfg.skip:
            raise HVAEError("skip (HVAE+) is an option of the vanilla stack; LVAE and BIVA have their own structure")
        if cfg.arch == "mlp":
            if len(cfg.latent_sizes) != len(cfg.hidden_sizes):
                raise HVAEError("latent_sizes and hidden_sizes must have one entry per stochastic layer")
            self.z_shapes = [(d,) for d in cfg.latent_sizes]
            self.feat_shapes = [(h,) for h in cfg.hidden_sizes]
        elif cfg.arch == "resnet":
            s = cfg.latent_stride
            if H % (2 * s) or W % (2 * s):
                raise HVAEError(f"image size {H}x{W} is not divisible by 2 * latent_stride = {2 * s}")
            hw = (H // (2 * s), W // (2 * s))
            self.z_shapes = [(cfg.latent_channels, *hw)] * L
            self.feat_shapes = [(cfg.channels, *hw)] * L
        else:
            raise HVAEError(f"unknown architecture {cfg.arch!r}: choose mlp or resnet")
        return L

    def net(self, in_shape, i: int, out_ch: int, data: str = ""):
        """A net of layer i: in_shape -> (out_ch Gaussian/likelihood params, features of layer i).

        data="in": reads the image (downsamples); data="out": writes image-sized likelihood params.
        """
        cfg = self.cfg
        if cfg.arch == "mlp":
            out = (out_ch, *self.image_shape[1:]) if data == "out" else (out_ch,)
            return MLP(in_shape, cfg.hidden_sizes[i], out, cfg.activation)
        down = 2 * cfg.latent_stride if data == "in" else 1
        up = 2 * cfg.latent_stride if data == "out" else 1
        return ConvNet(in_shape[0], cfg.channels, out_ch, cfg.data_blocks if data else cfg.blocks, down=down, up=up)

    @property
    def depth(self) -> int:
        return len(self.latent_shapes)

    def _device(self):
        return next(self.parameters()).device

    @staticmethod
    def _check_ou(ou):
        if ou is not None:
            raise HVAEError("OU smoothing is defined for the vanilla stack (methods hvae/vae/iwae), not for LVAE or BIVA")


class LadderVAE(_Stack):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__()
        L = self._setup(cfg, image_shape)
        self.latent_shapes = self.z_shapes
        zc = [s[0] for s in self.z_shapes]
        self.enc = nn.ModuleList([self.net(self.image_shape, 0, 2 * zc[0], "in")] +
                                 [self.net(self.feat_shapes[i - 1], i, 2 * zc[i]) for i in range(1, L)])
        self.gen = nn.ModuleList(self.net(self.z_shapes[i + 1], i, 2 * zc[i]) for i in range(L - 1))
        self.px = self.net(self.z_shapes[0], 0, self.n_out, "out")

    def forward(self, x, ou=None) -> Terms:
        self._check_ou(ou)
        ms, h = self.cfg.min_scale, x
        bu = []
        for enc in self.enc:  # deterministic bottom-up pass
            out, h = enc(h)
            bu.append(split_gaussian(out, ms))
        L = self.depth
        log_q, log_p, q_mean = [None] * L, [None] * L, [None] * L
        mu, sigma = bu[-1]
        z = mu + sigma * torch.randn_like(mu)
        log_q[-1], log_p[-1], q_mean[-1] = gaussian_logprob(z, mu, sigma), std_normal_logprob(z), mu
        for i in reversed(range(L - 1)):
            mu_p, sigma_p = split_gaussian(self.gen[i](z)[0], ms)
            mu, sigma = precision_weighted(*bu[i], mu_p, sigma_p)
            z = mu + sigma * torch.randn_like(mu)
            log_q[i], log_p[i], q_mean[i] = gaussian_logprob(z, mu, sigma), gaussian_logprob(z, mu_p, sigma_p), mu
        return Terms(self.likelihood.logprob(self.px(z)[0], x), log_q, log_p, q_mean)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True):
        dev = self._device()
        z = torch.randn((n, *self.latent_shapes[-1]), generator=generator, device=dev)
        for i in reversed(range(self.depth - 1)):
            mu, sigma = split_gaussian(self.gen[i](z)[0], self.cfg.min_scale)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=dev)
        params = self.px(z)[0]
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)


class BIVA(_Stack):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__()
        L = self._setup(cfg, image_shape)
        zs, fs = self.z_shapes, self.feat_shapes
        # Layers below the top hold (BU, TD): twice the channels / units.
        self.latent_shapes = [_cat_shape(s, s) for s in zs[:-1]] + [zs[-1]]
        zc = [s[0] for s in zs]
        self.bu = nn.ModuleList([self.net(self.image_shape, 0, 2 * zc[0], "in")] +
                                [self.net(_cat_shape(fs[i - 1], zs[i - 1]), i, 2 * zc[i]) for i in range(1, L)])
        self.td = nn.ModuleList(self.net(_cat_shape(fs[i], fs[i]), i, 2 * zc[i]) for i in range(L - 1))
        self.gen = nn.ModuleList(
            self.net(self.latent_shapes[i + 1] if i == L - 2 else _cat_shape(self.latent_shapes[i + 1], fs[i + 1]),
                     i, 4 * zc[i])
            for i in range(L - 1))
        px_in = self.latent_shapes[0] if L == 1 else _cat_shape(self.latent_shapes[0], fs[0])
        self.px = self.net(px_in, 0, self.n_out, "out")

    def _gen(self, i, z_above, h_above):
        """Generator layer i: (p(z_i^BU), p(z_i^TD)) as (mu, sigma) pairs, and its features h_i."""
        inp = z_above if h_above is None else torch.cat([z_above, h_above], 1)
        out, h = self.gen[i](inp)
        bu, td = out.chunk(2, dim=1)
        return split_gaussian(bu, self.cfg.min_scale), split_gaussian(td, self.cfg.min_scale), h

    def _px(self, z, h):
        return self.px(z if h is None else torch.cat([z, h], 1))[0]

    def forward(self, x, ou=None) -> Terms:
        self._check_ou(ou)
        ms, L = self.cfg.min_scale, self.depth
        d, z_bu, q_bu = [], [], []  # bottom-up: deterministic features, samples, (mu, sigma, log q)
        for i, net in enumerate(self.bu):
            out, h = net(x if i == 0 else torch.cat([d[-1], z_bu[-1]], 1))
            mu, sigma = split_gaussian(out, ms)
            z = mu + sigma * torch.randn_like(mu)
            d.append(h), z_bu.append(z), q_bu.append((mu, gaussian_logprob(z, mu, sigma)))
        log_q, log_p, q_mean = [None] * L, [None] * L, [None] * L
        z, h = z_bu[-1], None  # the top layer is the last bottom-up latent
        log_q[-1], log_p[-1], q_mean[-1] = q_bu[-1][1], std_normal_logprob(z), q_bu[-1][0]
        for i in reversed(range(L - 1)):  # top-down
            (mu_b, sig_b), (mu_t, sig_t), h = self._gen(i, z, h)
            mu, sigma = split_gaussian(self.td[i](torch.cat([h, d[i]], 1))[0], ms)
            z_td = mu + sigma * torch.randn_like(mu)
            log_q[i] = q_bu[i][1] + gaussian_logprob(z_td, mu, sigma)
            log_p[i] = gaussian_logprob(z_bu[i], mu_b, sig_b) + gaussian_logprob(z_td, mu_t, sig_t)
            q_mean[i] = torch.cat([q_bu[i][0], mu], 1)
            z = torch.cat([z_bu[i], z_td], 1)
        return Terms(self.likelihood.logprob(self._px(z, h), x), log_q, log_p, q_mean)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True):
        dev = self._device()
        z, h = torch.randn((n, *self.latent_shapes[-1]), generator=generator, device=dev), None
        for i in reversed(range(self.depth - 1)):
            (mu_b, sig_b), (mu_t, sig_t), h = self._gen(i, z, h)
            mu, sigma = torch.cat([mu_b, mu_t], 1), torch.cat([sig_b, sig_t], 1)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=dev)
        params = self._px(z, h)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)


MODELS = {"lvae": LadderVAE, "biva": BIVA}


def build(method: str, cfg: ModelConfig, image_shape) -> nn.Module:
    """The baseline model of ``method`` ("lvae" or "biva") for ``cfg`` and images of ``image_shape``."""
    if method not in MODELS:
        raise HVAEError(f"unknown baseline {method!r}: choose {' or '.join(MODELS)}")
    return MODELS[method](cfg, image_shape)
