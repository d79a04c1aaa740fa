"""Baselines of the paper's Tables 2, 5 and 6: the Ladder VAE and BIVA.

Both return the same ``Terms`` as ``HierarchicalVAE`` (per stochastic layer, bottom to top: log q of
the sampled z under the posterior actually sampled from, log p under the generative model), so the
trainer, the objectives (ELBO, IW bound, IWAE, annealing, free bits) and the evaluation run on them
unchanged. OU smoothing is defined for the vanilla stack only: ``forward(x, ou)`` with ``ou`` given
raises HVAEError. Both work for ``arch="mlp"`` (nets.MLP) and ``arch="resnet"`` (nets.ConvNet)
configs; every net returns (Gaussian parameters, the features before its head). Shapes, the
likelihood and ``sample()`` come from the shared base ``stack.StackedVAE``; the registry that
builds them (``MODELS``, ``build_model``) is in model.py, above this module.

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
from .distributions import Terms, gaussian_logprob, repeat_batch, split_gaussian, std_normal_logprob
from .errors import HVAEError
from .stack import StackedVAE


def precision_weighted(mu_hat, sigma_hat, mu_p, sigma_p):
    """Merge two Gaussians by precision weighting (LVAE, eq. 18-19 of Sonderby et al.): mu_q, sigma_q."""
    prec_hat, prec_p = sigma_hat.pow(-2), sigma_p.pow(-2)
    var_q = 1.0 / (prec_hat + prec_p)
    return (mu_hat * prec_hat + mu_p * prec_p) * var_q, var_q.sqrt()


def _cat_shape(a, b):
    """Shape of torch.cat([A, B], 1) for per-example shapes a, b."""
    return (a[0] + b[0], *a[1:])


class _Baseline(StackedVAE):
    """LVAE and BIVA: no HVAE+ skips (they have their own top-down paths), no OU smoothing."""

    def __init__(self, cfg: ModelConfig, image_shape):
        if cfg.skip:
            raise HVAEError("skip (HVAE+) is an option of the vanilla stack; LVAE and BIVA have their own structure")
        super().__init__(cfg, image_shape)

    @staticmethod
    def _check_ou(ou):
        if ou is not None:
            raise HVAEError("OU smoothing is defined for the vanilla stack (methods hvae/vae/iwae), not for LVAE or BIVA")


class LadderVAE(_Baseline):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)
        L, zc = self.depth, [s[0] for s in self.z_shapes]
        self.enc = nn.ModuleList([self.net(self.image_shape, 0, 2 * zc[0], "in")] +
                                 [self.net(self.feat_shapes[i - 1], i, 2 * zc[i]) for i in range(1, L)])
        self.gen = nn.ModuleList(self.net(self.z_shapes[i + 1], i, 2 * zc[i]) for i in range(L - 1))
        self.px = self.net(self.z_shapes[0], 0, self.n_out, "out")

    def prior(self, i: int, z_above, state=None):
        return split_gaussian(self.gen[i](z_above)[0], self.cfg.min_scale), None

    def decode(self, z, state=None):
        return self.px(z)[0]

    def forward(self, x, ou=None, k: int = 1) -> Terms:
        """k posterior samples per example of x [B, ...]: Terms of [k * B], sample-major."""
        self._check_ou(ou)
        x = repeat_batch(x, k)
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
            (mu_p, sigma_p), _ = self.prior(i, z)
            mu, sigma = precision_weighted(*bu[i], mu_p, sigma_p)
            z = mu + sigma * torch.randn_like(mu)
            log_q[i], log_p[i], q_mean[i] = gaussian_logprob(z, mu, sigma), gaussian_logprob(z, mu_p, sigma_p), mu
        return Terms(self.likelihood.logprob(self.decode(z), x), log_q, log_p, q_mean)


class BIVA(_Baseline):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)
        L, zs, fs = self.depth, self.z_shapes, self.feat_shapes
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

    def prior(self, i: int, z_above, h_above):
        (mu_b, sig_b), (mu_t, sig_t), h = self._gen(i, z_above, h_above)
        return (torch.cat([mu_b, mu_t], 1), torch.cat([sig_b, sig_t], 1)), h

    def decode(self, z, h):
        return self.px(z if h is None else torch.cat([z, h], 1))[0]

    def forward(self, x, ou=None, k: int = 1) -> Terms:
        """k posterior samples per example of x [B, ...]: Terms of [k * B], sample-major."""
        self._check_ou(ou)
        x = repeat_batch(x, k)
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
        return Terms(self.likelihood.logprob(self.decode(z, h), x), log_q, log_p, q_mean)
