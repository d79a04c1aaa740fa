"""``TopDownLadder`` (``--method ladder``): a small VDVAE-style top-down ladder (Child 2021, openai/vdvae).

Layers i = 0..L-1 bottom (next to x) to top, as every model here; ``cfg.latents_per_scale`` = (n_0,
.., n_{S-1}) puts n_s of them at scale s, the resolution H / 2^s x W / 2^s: layers 0..n_0-1 at H x W,
the next n_1 at H/2, .. the top ones at the coarsest (n_{S-1} >= 1). Leading zeros start the ladder
s0 halvings below the image (the CPU-sized presets: (0, 3, 3) on 28x28 puts 3 latents at 14x14 and
3 at 7x7). W = ``cfg.channels`` maps everywhere, latents of Z = ``cfg.latent_channels`` maps at
their layer's resolution: z_i [N, Z, h_i, w_i], h_i = H / 2^scale(i).

Block(cin -> cout): VDVAE's bottleneck, 1x1 (cin -> W/4), 3x3, 3x3, 1x1 (-> cout) convolutions, each
after a GELU (3x3s become 1x1s at 2x2 and below); "residual" adds its input.

    encoder    a = conv3x3(x) (stride 2, then s0 - 1 more GELU + stride-2 conv3x3 when s0 > 0);
               per scale s >= s0: a = ``cfg.blocks`` residual Blocks(W -> W), kept as a_s, then 2x2
               average pooling before scale s+1.                               a_s [N, W, h_s, w_s]
    top        s_{L-1} = b, a learned [W, h, w] at the coarsest scale, the same for every example;
               p(z_{L-1}) = N(0, I) (VDVAE: a learned Gaussian read from b; see docs/choices.md).
    layer i    (mu_p, sigma_p, f_i) = P_i(s_i)      Block(W -> 2Z + W), last conv zero at init
      (i<L-1)  u_i = s_i + f_i                      the prior's feature joins the state
               (mu_q, sigma_q) = Q_i([s_i, a_s(i)]) Block(2W -> 2Z): the posterior shares s_i
               z_i ~ q (training, eval), ~ p (``sample``)
               t_i = R_i(u_i + proj_i(z_i))         proj_i: 1x1 conv Z -> W; R_i: residual Block(W -> W)
               s_{i-1} = up(t_i)                    nearest x2^(scale(i) - scale(i-1)), 1 within a scale
    top layer  the same with u_{L-1} = s_{L-1} = b (no prior block: its prior is N(0, I))
    p(x | .)   out(t_0) = conv1x1(GELU(t_0)) (s0 > 0: s0 GELU + stride-2 transposed 4x4 convs, the
               last to the likelihood's channels): the likelihood's parameters [N, n_out, H, W].
Gaussians: sigma = softplus(raw) + min_scale; the posterior's mean mu_q is ``Terms.q_mean``.

Generator layer i < L-1 is the map from z_{i+1} and the state u_{i+1} it reads to p(z_i)'s head:

    f_i(z_{i+1}, u_{i+1}) = P_i^{mu, sigma}(up(R_{i+1}(u_{i+1} + proj_{i+1}(z_{i+1}))))

(``generator_head``; ``generator_parameters``: proj_{i+1}, R_{i+1}, P_i). OU smoothing (issue 22,
training only) replaces log p(z_i | .) by log N(z_i | K-average of f_i(z'_k, u_{i+1})) over the
correlated samples z'_k around the posterior sample z_{i+1} (smoothing.smoothed_logprob); u_{i+1}
is the state of the real samples above, repeated for every k, not smoothed, and the top-down pass
(the posteriors, the states, p(x | .)) goes on with the real z_{i+1}, as in the LVAE and BIVA.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..distributions import Terms, gaussian_logprob, normal_like, repeat_batch, split_gaussian, std_normal_logprob
from ..errors import HVAEError
from .smoothing import OUSmoothing, check_ladder_ou, smooth_ladder_layers
from .stack import StackedVAE


class Block(nn.Module):
    """VDVAE's bottleneck block: [N, cin, H, W] -> [N, cout, H, W] (+ x when ``residual``, cin = cout)."""

    def __init__(self, cin: int, mid: int, cout: int, residual: bool = False, use_3x3: bool = True,
                 last_scale: float = 1.0):
        super().__init__()
        k, p = (3, 1) if use_3x3 else (1, 0)
        self.convs = nn.ModuleList([nn.Conv2d(cin, mid, 1), nn.Conv2d(mid, mid, k, padding=p),
                                    nn.Conv2d(mid, mid, k, padding=p), nn.Conv2d(mid, cout, 1)])
        self.residual = residual
        with torch.no_grad():  # VDVAE: residual branches scaled down by the number of blocks; priors start at zero
            self.convs[-1].weight.mul_(last_scale)

    def forward(self, x):
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


class TopDownLadder(StackedVAE):
    """The VDVAE-style ladder of the module docstring; ``state`` (``prior``, ``decode``,
    ``generator_head``) is the top-down state u_{i+1} [N, W, h, w] the layer below reads."""

    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)  # the shared shape checks first
        if cfg.arch != "resnet" or cfg.skip or cfg.latent_stride != 1:
            raise HVAEError(f"--method ladder is convolutional with its own layout (--latents-per-scale): it needs "
                            f"--arch resnet, --no-skip and --latent-stride 1, got {cfg.arch}, skip {cfg.skip}, latent "
                            f"stride {cfg.latent_stride}: pass those, or a ladder preset (`hvae-fast presets`)")
        C, H, Wd = self.image_shape
        S, W, Z, n = len(cfg.latents_per_scale), cfg.channels, cfg.latent_channels, cfg.latents_per_scale
        spec = ",".join(map(str, n))
        if not n or n[-1] < 1:
            raise HVAEError(f"--latents-per-scale {spec}: the coarsest resolution needs a latent: drop its 0 entries")
        if H % 2 ** (S - 1) or Wd % 2 ** (S - 1):
            raise HVAEError(f"--latents-per-scale {spec} halves the image {S - 1} times; {H}x{Wd} does not allow it: "
                            f"pass fewer entries")
        self.scale = [s for s in range(S) for _ in range(n[s])]  # per layer, bottom to top
        s0 = self.scale[0]  # leading zeros: the ladder starts s0 halvings below the image
        self.z_shapes = [(Z, H >> s, Wd >> s) for s in self.scale]
        self.feat_shapes = [(W, H >> s, Wd >> s) for s in self.scale]
        self.latent_shapes = list(self.z_shapes)
        L, mid = len(self.scale), max(1, W // 4)

        def block(cin, cout, s, **kw):
            return Block(cin, mid, cout, use_3x3=min(H, Wd) >> s > 2, **kw)

        # The image enters (and p(x | .) leaves) through s0 strided (transposed) convolutions.
        self.enc_in = nn.Sequential(nn.Conv2d(C, W, 3, stride=2 if s0 else 1, padding=1),
                                    *(m for _ in range(s0 - 1) for m in (nn.GELU(), nn.Conv2d(W, W, 3, 2, 1))))
        n_enc = max(1, (S - s0) * cfg.blocks)
        self.enc = nn.ModuleList(nn.Sequential(*(block(W, W, s, residual=True, last_scale=n_enc ** -0.5)
                                                 for _ in range(cfg.blocks if s >= s0 else 0))) for s in range(S))
        self.bias = nn.Parameter(torch.zeros(1, W, H >> (S - 1), Wd >> (S - 1)))
        self.q = nn.ModuleList(block(2 * W, 2 * Z, s) for s in self.scale)
        self.p = nn.ModuleList(block(W, 2 * Z + W, s, last_scale=0.0) for s in self.scale[:-1])
        self.proj = nn.ModuleList(nn.Conv2d(Z, W, 1) for _ in range(L))
        self.res = nn.ModuleList(block(W, W, s, residual=True, last_scale=L ** -0.5) for s in self.scale)
        with torch.no_grad():
            for proj in self.proj:
                proj.weight.mul_(L ** -0.5)
        self.out = nn.Sequential(*(m for _ in range(s0 - 1) for m in (nn.GELU(), nn.ConvTranspose2d(W, W, 4, 2, 1))),
                                 nn.GELU(), nn.ConvTranspose2d(W, self.n_out, 4, 2, 1) if s0 else nn.Conv2d(W, self.n_out, 1))

    # -- the pieces of the top-down pass -------------------------------------------------------------
    def _encode(self, x) -> list:
        """The encoder's activations a_s [N, W, h_s, w_s], finest scale first."""
        a, acts = self.enc_in(x), [None] * self.scale[0]
        for s in range(self.scale[0], len(self.enc)):
            if s > self.scale[0]:
                a = F.avg_pool2d(a, 2)
            a = self.enc[s](a)
            acts.append(a)
        return acts

    def _state_below(self, i: int, u, z):
        """s_{i-1} = up(R_i(u_i + proj_i(z_i))): the state layer i passes down (t_0 for i = 0)."""
        t = self.res[i](u + self.proj[i](z))
        up = 2 ** (self.scale[i] - self.scale[i - 1]) if i else 1
        return F.interpolate(t, scale_factor=up, mode="nearest") if up > 1 else t

    def _prior_block(self, i: int, s):
        """P_i on the state s_i: (p(z_i)'s raw head [N, 2Z, ...], u_i = s_i + f_i)."""
        out = self.p[i](s)
        Z2 = 2 * self.cfg.latent_channels
        return out[:, :Z2], s + out[:, Z2:]

    def _top_state(self, n: int):
        return self.bias.expand(n, *self.bias.shape[1:])

    # -- StackedVAE's interface ----------------------------------------------------------------------
    def prior(self, i: int, z_above, state=None):
        """p(z_i | z_{i+1}, u_{i+1}) as (mu, sigma), and u_i; ``state`` u_{i+1} (None: the top's, b)."""
        u = self._top_state(z_above.shape[0]) if state is None else state
        raw, u_i = self._prior_block(i, self._state_below(i + 1, u, z_above))
        return split_gaussian(raw, self.cfg.min_scale), u_i

    def generator_head(self, i: int, z_above, u_above):
        return self._prior_block(i, self._state_below(i + 1, u_above, z_above))[0].chunk(2, dim=1)

    def generator_parameters(self, i: int) -> list:
        return [p for m in (self.proj[i + 1], self.res[i + 1], self.p[i]) for p in m.parameters()]

    def generator_inputs(self, x) -> list:
        return self._top_down(x)[1]

    def decode(self, z, state=None):
        u = self._top_state(z.shape[0]) if state is None else state
        return self.out(self._state_below(0, u, z))

    def _top_down(self, x) -> tuple:
        """The plain forward of x [N, ...]: Terms, and per generator layer (top first) the inputs
        (i, z_{i+1}, (mu, sigma) of q(z_{i+1} | .), z_i, (u_{i+1},)). Posterior draws run top-down."""
        ms, L = self.cfg.min_scale, self.depth
        acts = self._encode(x)
        log_q, log_p, q_mean, layers = [None] * L, [None] * L, [None] * L, []
        s = self._top_state(x.shape[0])
        for i in reversed(range(L)):
            if i == L - 1:
                u = s
            else:
                raw_p, u = self._prior_block(i, s)
                mu_p, sigma_p = split_gaussian(raw_p, ms)
            mu, sigma = split_gaussian(self.q[i](torch.cat([s, acts[self.scale[i]]], 1)), ms)
            z = mu + sigma * normal_like(mu)
            log_q[i], q_mean[i] = gaussian_logprob(z, mu, sigma), mu
            if i == L - 1:
                log_p[i] = std_normal_logprob(z)
            else:
                log_p[i] = gaussian_logprob(z, mu_p, sigma_p)
                layers.append((i, z_above, q_above, z, (u_above,)))
            s = self._state_below(i, u, z)  # i = 0: t_0, p(x | .)'s input
            z_above, q_above, u_above = z, (mu, sigma), u
        return Terms(self.likelihood.logprob(self.out(s), x), log_q, log_p, q_mean), layers

    def forward(self, x, ou: OUSmoothing | None = None, k: int = 1) -> Terms:
        """k posterior samples per example of x [B, ...]: Terms of [k * B], sample-major. With ``ou``
        (training) each log p(z_i | z_{i+1}, u_{i+1}) is OU-smoothed around z_{i+1}; the OU seeds are
        drawn after every posterior draw, so a smoothed and a plain forward from one seed share samples."""
        check_ladder_ou(ou, type(self).__name__)
        terms, layers = self._top_down(repeat_batch(x, k))
        return terms if ou is None else smooth_ladder_layers(ou, terms, layers, self.generator_head, self.cfg.min_scale)
