"""Baselines of the paper's Tables 2, 5 and 6: the Ladder VAE and BIVA.

Both return the same ``Terms`` as ``HierarchicalVAE`` (per stochastic layer, bottom to top: log q of
the sampled z under the posterior actually sampled from, log p under the generative model), so the
trainer, the objectives (ELBO, IW bound, IWAE, annealing, free bits) and the evaluation run on them
unchanged. ``forward(x, ou)`` with ``ou`` (training) OU-smooths every generator layer with the helper
the stacked VAE uses (smoothing.py; see ``_Baseline``): only the latent z_{i+1} a layer reads is
smoothed; the top-down state it reads (LVAE ResNet: the block outputs of the stage above; BIVA: the
deterministic h_{i+1}, or those block outputs) is a function of the real samples above and enters
as it is, as HVAE+'s skips do. Shapes, the likelihood and ``sample()`` come from the shared base
``stack.StackedVAE``; the registry that builds them (``MODELS``, ``build_model``) is in model.py.
BIVA's layers below the top hold two latents (BU, TD) of one shape, counted as one stochastic layer
in ``Terms`` (log densities summed; ``q_mean``, ``latent_shapes`` concatenated along dim 1, BU first).

ResNet (``arch="resnet"``): the BIVA authors' PyTorch code (github.com/vlievin/biva-pytorch,
biva/model/{architectures,stage,stochastic}.py, biva/layers/block.py), which the paper measured.
    stages      ``reference_stages``: get_deep_vae_cifar at any depth. CIFAR-10 presets: 15 stages of
                3 gated blocks of 96 maps (5x5 kernels in stage 0, 3x3 above), the last block of
                stages 0, 10 and 14 strided; latents of 38, 36, .., 10 maps at 16x16 (stages 0-9),
                8x8 (10-13) and 4x4 (the top). Gaussian heads: ELU, then a conv as large as the map.
    blocks      nets.GatedResBlock: weight-normalised convs, TensorFlow 'SAME' padding, gated
                output, an auxiliary input; block j of generative stage i also reads block j of
                stage i+1 (the code's skip connections); p(x|z_1): ELU and a 1x1 conv.
    LVAE        (LvaeStage) deterministic bottom-up pass h_i (each block of stage i > 0 also reads
                the stage's input); d_i = generative features from above; p(z_i | d_i) from a head;
                q(z_i | .) from a head on merge_i(h_i, d_i), a gated block (the learned merge; the
                top's has no d).
    BIVA        (BivaIntermediateStage, BivaTopStage) stochastic bottom-up path: stage i's BU blocks
                read z_{i-1}^BU and [BU, TD] features of stage i-1, q(z_i^BU) from a head; TD blocks
                read the stage's BU output; the top latent from a gated block on [BU, TD]; q(z_i^TD)
                from a head on merge_i(TD features, d_i); p(z_i^BU | d_i), p(z_i^TD | d_i) from two heads.
  Matches: every module, shape and connection above, and so the parameter counts: 59,576,896 (LVAE)
  and 102,948,560 (BIVA) on CIFAR-10, the authors' code's counts (the paper: 59.5M, 103M); without
  its skips the code's LVAE has 58,196,800, neither is Table 5's LVAE+ 73.35M, which is not built.
  Still differs: sigma = softplus(raw) + min_scale (the code: sigma = exp(softplus(raw) / 2) >= 1);
  no data-dependent weight-norm initialisation, dropout or weight EMA (training recipe, not memory
  layout); BIVA's latents concatenate (BU, TD) (the code: TD, BU). The issue's "precision weighting
  in BIVA's top-down posterior" and "top layers at 8x8" are not what the code does: its TD posterior
  is the learned merge, and its top latent is at 4x4; the code is followed. Depths other than 15 halve
  the image in stages 0, floor(2L/3) and L-1 (this module's generalisation); images must be square.

MLP (``arch="mlp"``): the authors' code has no MLP models (its MNIST ones are convolutional), so
    LVAE        Sonderby et al. 2016, layers i = 1..L (z_1 next to x)
                bottom-up d_1 = f_1(x), d_i = f_i(d_{i-1}); (mu_hat_i, sigma_hat_i) = head_i(d_i)
                top-down z_L ~ N(mu_hat_L, sigma_hat_L^2); for i < L: (mu_p, sigma_p) = gen_i(z_{i+1}),
                precision weighting sigma_q^2 = 1 / (sigma_hat^-2 + sigma_p^-2),
                mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2, z_i ~ N(mu_q, sigma_q^2).
                The generative model is exactly the vanilla stack's.
    BIVA        simplified: generative h_{L-1} = g_{L-1}(z_L), h_i = g_i([z_{i+1}, h_{i+1}]),
                p(z_i^BU, z_i^TD | z_{>i}) two diagonal Gaussians from g_i's head, p(x|z) = px([z_1, h_1]);
                inference d_1 = b_1(x), d_i = b_i([d_{i-1}, z_{i-1}^BU]), q(z_i^BU) from b_i's head,
                q(z_L) from b_L's; q(z_i^TD) = t_i([h_i, d_i]) with h_i the generative path on the
                posterior samples. [a, b] is concatenation along dim 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..distributions import Terms, gaussian_logprob, normal_like, repeat_batch, split_gaussian, std_normal_logprob
from ..errors import HVAEError
from .nets import GatedResBlock, WNConv
from .smoothing import OUSmoothing, check_ladder_ou, smooth_ladder_layers
from .stack import StackedVAE


def precision_weighted(mu_hat, sigma_hat, mu_p, sigma_p):
    """Merge two Gaussians by precision weighting (LVAE, eq. 18-19 of Sonderby et al.): mu_q, sigma_q."""
    prec_hat, prec_p = sigma_hat.pow(-2), sigma_p.pow(-2)
    var_q = 1.0 / (prec_hat + prec_p)
    return (mu_hat * prec_hat + mu_p * prec_p) * var_q, var_q.sqrt()


def _cat_shape(a, b):
    """Shape of torch.cat([A, B], 1) for per-example shapes a, b."""
    return (a[0] + b[0], *a[1:])


class Stage(NamedTuple):
    """One stage of the reference ResNet: ``blocks`` gated blocks of kernel ``k`` (the last strided by
    ``stride`` going up), then a latent of ``z`` maps at ``hw``."""
    blocks: int
    k: int
    stride: int
    z: int
    hw: tuple


def reference_stages(cfg: ModelConfig, image_shape) -> list:
    """The BIVA authors' CIFAR-10 layout (architectures.get_deep_vae_cifar) at any depth L, bottom to top.

    Stage i: ``data_blocks`` (i = 0) or ``blocks`` gated blocks of 5x5 (i = 0) or 3x3 kernels; the
    image is halved in stages 0, floor(2L/3) and L-1; latent maps latent_channels + 2 (L-1-i).
    L = 15 on 3x32x32: 3 blocks each, latents 38..20 maps at 16x16, 18..12 at 8x8, 10 at 4x4."""
    if cfg.latent_stride != 1:
        raise HVAEError("LVAE and BIVA ResNets place their latents as the BIVA authors' code does: drop --latent-stride")
    if min(cfg.blocks, cfg.data_blocks) < 1:
        raise HVAEError("LVAE and BIVA ResNets need at least one block per stage: pass --blocks and --data-blocks >= 1")
    L, (_, h, w) = cfg.num_layers, image_shape
    halve, stages = {0, (2 * L) // 3, L - 1}, []
    for i in range(L):
        s = 2 if i in halve else 1
        if h % s or w % s or h != w:
            raise HVAEError(f"LVAE/BIVA ResNets halve square images {len(halve)} times; {image_shape[1]}x{image_shape[2]} "
                            f"does not allow it at {L} layers: use fewer layers or the MLP models")
        h, w = h // s, w // s
        stages.append(Stage(cfg.data_blocks if i == 0 else cfg.blocks, 5 if i == 0 else 3, s,
                            cfg.latent_channels + 2 * (L - 1 - i), (h, w)))
    return stages


def _q_blocks(cin, ch, st: Stage, residual: bool, aux_ch=0, aux_ratio=1.0):
    """A stage's inference blocks, the last one strided; the first has no residual unless ``residual``."""
    n = st.blocks
    return nn.ModuleList(GatedResBlock(cin if j == 0 else ch, ch, st.k, st.stride if j == n - 1 else 1, aux_ch=aux_ch,
                                       aux_ratio=aux_ratio, residual=residual or j > 0) for j in range(n))


def _p_blocks(cin, ch, st: Stage, n_aux: int):
    """A stage's generative blocks, the first one upsampling by the stage's stride (no residual);
    block j < n_aux also reads block j of the stage above (the reference's generative skips)."""
    return nn.ModuleList(GatedResBlock(cin if j == 0 else ch, ch, st.k, st.stride if j == 0 else 1, up=True,
                                       aux_ch=ch if j < n_aux else 0, aux_ratio=1 if j == 0 else 1 / st.stride,
                                       residual=j > 0) for j in range(st.blocks))


def _head(ch, z, st: Stage):
    """Gaussian parameters [N, 2z, *hw] from features [N, ch, *hw]: ELU, then a conv as large as the map."""
    return nn.Sequential(nn.ELU(), WNConv(ch, 2 * z, st.hw[0]))


def _chain(blocks, x, aux=()):
    """x through the blocks, block j also reading aux[j] where given: (output, [each block's output])."""
    hs = []
    for j, b in enumerate(blocks):
        x = b(x, aux[j] if j < len(aux) else None)
        hs.append(x)
    return x, hs


def _sample(mu, sigma):
    return mu + sigma * normal_like(mu)


class _Baseline(StackedVAE):
    """LVAE and BIVA: no HVAE+ skips (they have their own top-down paths). ResNet configs follow the
    reference's stages (``self.stages``); its generative stage i runs ``self.p[i]`` and passes every
    block's output down as the ``state`` of layer i-1.

    OU smoothing (``forward(x, ou)``, training only) replaces each log p(z_i | z_{i+1}, state) by
    ``smoothed_logprob`` around the posterior sample z_{i+1}: the K correlated samples run through
    ``generator_head(i, ., *state)``, the block that maps z_{i+1} and the top-down state it reads (from
    the real samples above, unsmoothed) to p(z_i)'s head; the top-down pass goes on with the real
    sample. A subclass defines ``generator_head`` and ``_top_down(x)``: the plain forward's Terms
    and, per generator layer, the inputs it read (``generator_inputs``)."""

    def __init__(self, cfg: ModelConfig, image_shape):
        if cfg.skip:
            raise HVAEError("skip (HVAE+) is an option of the vanilla stack; LVAE and BIVA have their own structure")
        super().__init__(cfg, image_shape)
        self.conv = cfg.arch == "resnet"
        if self.conv:
            self.stages = reference_stages(cfg, self.image_shape)
            self.z_shapes = [(st.z, *st.hw) for st in self.stages]
            self.feat_shapes = [(cfg.channels, *st.hw) for st in self.stages]
            self.latent_shapes = list(self.z_shapes)

    def _p_stages(self, z_channels):
        """Generative blocks of every stage (stage i reads a latent of z_channels[i] maps) and p(x|z_1)'s 1x1 head."""
        st, ch = self.stages, self.cfg.channels
        self.p = nn.ModuleList(_p_blocks(z_channels[i], ch, s, st[i + 1].blocks if i + 1 < len(st) else 0)
                               for i, s in enumerate(st))
        self.out = nn.Sequential(nn.ELU(), WNConv(ch, self.n_out, 1))

    def _down(self, i, z, state):
        """Generative stage i on its latent z and the block outputs of stage i+1: (features d, block outputs)."""
        return _chain(self.p[i], z, state or ())

    def _top_down(self, x) -> tuple:
        raise NotImplementedError

    def generator_inputs(self, x) -> list:
        return self._top_down(x)[1]

    def forward(self, x, ou: OUSmoothing | None = None, k: int = 1) -> Terms:
        """k posterior samples per example of x [B, ...]: Terms of [k * B], sample-major. With ``ou``
        (training), each log p(z_i | z_{i+1}, state) is OU-smoothed around z_{i+1} with the posterior
        that drew it (``generator_inputs``); the posteriors use the real sample's prior. The smoothing
        runs after the top-down pass, so the OU seeds come after every posterior draw from torch's
        RNG: with one seed, the smoothed and the plain forward share their posterior samples."""
        check_ladder_ou(ou, type(self).__name__)
        terms, layers = self._top_down(repeat_batch(x, k))
        return terms if ou is None else smooth_ladder_layers(ou, terms, layers, self.generator_head, self.cfg.min_scale)


class LadderVAE(_Baseline):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)
        L = self.depth
        if self.conv:  # the reference's LvaeStage
            st, ch, C = self.stages, cfg.channels, self.image_shape[0]
            self.q = nn.ModuleList(_q_blocks(C if i == 0 else ch, ch, s, i > 0, aux_ch=ch if i else 0)
                                   for i, s in enumerate(st))
            self.merge = nn.ModuleList(GatedResBlock(ch, ch, s.k, aux_ch=ch if i < L - 1 else 0) for i, s in enumerate(st))
            self.q_head = nn.ModuleList(_head(ch, s.z, s) for s in st)
            self.p_head = nn.ModuleList(_head(ch, s.z, s) for s in st[:-1])
            self._p_stages([s.z for s in st])
            return
        zc = [s[0] for s in self.z_shapes]
        self.enc = nn.ModuleList([self.net(self.image_shape, 0, 2 * zc[0], "in")] +
                                 [self.net(self.feat_shapes[i - 1], i, 2 * zc[i]) for i in range(1, L)])
        self.gen = nn.ModuleList(self.net(self.z_shapes[i + 1], i, 2 * zc[i]) for i in range(L - 1))
        self.px = self.net(self.z_shapes[0], 0, self.n_out, "out")

    def prior(self, i: int, z_above, state=None):
        if self.conv:
            d, state = self._down(i + 1, z_above, state)
            return split_gaussian(self.p_head[i](d), self.cfg.min_scale), state
        return split_gaussian(self.gen[i](z_above)[0], self.cfg.min_scale), None

    def generator_head(self, i: int, z_above, *state):
        # ResNet: generative stage i+1 (reading the block outputs of stage i+2) and p(z_i)'s head; MLP: gen[i].
        out = self.p_head[i](self._down(i + 1, z_above, list(state))[0]) if self.conv else self.gen[i](z_above)[0]
        return out.chunk(2, dim=1)

    def generator_parameters(self, i: int) -> list:
        mods = [self.p[i + 1], self.p_head[i]] if self.conv else [self.gen[i]]
        return [p for m in mods for p in m.parameters()]

    def decode(self, z, state=None):
        return self.out(self._down(0, z, state)[0]) if self.conv else self.px(z)[0]

    def _top_down(self, x) -> tuple:
        """The plain forward of x [N, ...]: Terms, and per generator layer (top first) the inputs
        (i, z_{i+1}, (mu, sigma) of its posterior (MLP: the precision-weighted one), z_i, state)."""
        if self.conv:
            return self._top_down_conv(x)
        ms, h = self.cfg.min_scale, x
        bu = []
        for enc in self.enc:  # deterministic bottom-up pass
            out, h = enc(h)
            bu.append(split_gaussian(out, ms))
        L = self.depth
        log_q, log_p, q_mean, layers = [None] * L, [None] * L, [None] * L, []
        mu, sigma = bu[-1]
        z = _sample(mu, sigma)
        log_q[-1], log_p[-1], q_mean[-1] = gaussian_logprob(z, mu, sigma), std_normal_logprob(z), mu
        for i in reversed(range(L - 1)):
            (mu_p, sigma_p), _ = self.prior(i, z)
            mu_q, sigma_q = precision_weighted(*bu[i], mu_p, sigma_p)
            z_i = _sample(mu_q, sigma_q)
            log_q[i], q_mean[i] = gaussian_logprob(z_i, mu_q, sigma_q), mu_q
            log_p[i] = gaussian_logprob(z_i, mu_p, sigma_p)
            layers.append((i, z, (mu, sigma), z_i, ()))
            z, mu, sigma = z_i, mu_q, sigma_q
        return Terms(self.likelihood.logprob(self.decode(z), x), log_q, log_p, q_mean), layers

    def _top_down_conv(self, x) -> tuple:
        ms, L, h, hs = self.cfg.min_scale, self.depth, x, []
        for i, q in enumerate(self.q):  # deterministic bottom-up pass; each block also reads the stage's input
            h = _chain(q, h, [h] * len(q) if i else ())[0]
            hs.append(h)
        log_q, log_p, q_mean, layers = [None] * L, [None] * L, [None] * L, []
        z = state = mu = sigma = None
        for i in reversed(range(L)):
            state_above = state  # the block outputs of stage i+2 that generative stage i+1 reads
            if i == L - 1:
                hq = self.merge[i](hs[i])
            else:
                d, state = self._down(i + 1, z, state)
                mu_p, sigma_p = split_gaussian(self.p_head[i](d), ms)
                hq = self.merge[i](hs[i], d)  # the learned merge of the bottom-up and top-down features
            mu_q, sigma_q = split_gaussian(self.q_head[i](hq), ms)
            z_i = _sample(mu_q, sigma_q)
            log_q[i], q_mean[i] = gaussian_logprob(z_i, mu_q, sigma_q), mu_q
            if i == L - 1:
                log_p[i] = std_normal_logprob(z_i)
            else:
                log_p[i] = gaussian_logprob(z_i, mu_p, sigma_p)
                layers.append((i, z, (mu, sigma), z_i, tuple(state_above or ())))
            z, mu, sigma = z_i, mu_q, sigma_q
        return Terms(self.likelihood.logprob(self.decode(z, state), x), log_q, log_p, q_mean), layers


class BIVA(_Baseline):
    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__(cfg, image_shape)
        L, zs, fs = self.depth, self.z_shapes, self.feat_shapes
        # Layers below the top hold (BU, TD): twice the channels / units.
        self.latent_shapes = [_cat_shape(s, s) for s in zs[:-1]] + [zs[-1]]
        if self.conv:  # the reference's BivaIntermediateStage and BivaTopStage
            st, ch, C = self.stages, cfg.channels, self.image_shape[0]
            self.q_bu = nn.ModuleList(_q_blocks(C if i == 0 else st[i - 1].z, ch, s, i > 0, aux_ch=2 * ch if i else 0)
                                      for i, s in enumerate(st))
            self.q_td = nn.ModuleList(_q_blocks(C if i == 0 else ch, ch, s, i > 0, aux_ch=ch, aux_ratio=1 / s.stride)
                                      for i, s in enumerate(st))
            self.q_top = GatedResBlock(2 * ch, ch, st[-1].k)
            self.merge = nn.ModuleList(GatedResBlock(ch, ch, 3, aux_ch=ch) for _ in st[:-1])
            self.q_head_bu = nn.ModuleList(_head(ch, s.z, s) for s in st)  # the top's reads q_top
            self.q_head_td, self.p_head_bu, self.p_head_td = (nn.ModuleList(_head(ch, s.z, s) for s in st[:-1])
                                                              for _ in range(3))
            self._p_stages([s[0] for s in self.latent_shapes])
            return
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

    @staticmethod
    def _state(h_above) -> tuple:
        """The top-down state a generator layer reads, as a tuple of tensors (MLP: (h,); ResNet: block outputs)."""
        return () if h_above is None else (h_above,) if torch.is_tensor(h_above) else tuple(h_above)

    def _gen_raw(self, i, z_above, *state):
        """Generator layer i on z_{i+1} and the state of layer i+1 (``_state``): the raw heads of
        p(z_i^BU) and p(z_i^TD) [N, 2 z, ...], its state for layer i-1 (MLP: the features h_i;
        ResNet: the block outputs of stage i+1), and (ResNet) its features d."""
        if self.conv:
            d, state = self._down(i + 1, z_above, list(state))
            return self.p_head_bu[i](d), self.p_head_td[i](d), state, d
        out, h = self.gen[i](torch.cat([z_above, *state], 1))
        return *out.chunk(2, dim=1), h, None

    def _gen(self, i, z_above, h_above):
        """Generator layer i: (p(z_i^BU), p(z_i^TD)) as (mu, sigma) pairs, its state for layer i-1, features d."""
        ms = self.cfg.min_scale
        bu, td, state, d = self._gen_raw(i, z_above, *self._state(h_above))
        return split_gaussian(bu, ms), split_gaussian(td, ms), state, d

    def generator_parameters(self, i: int) -> list:
        mods = [self.p[i + 1], self.p_head_bu[i], self.p_head_td[i]] if self.conv else [self.gen[i]]
        return [p for m in mods for p in m.parameters()]

    def generator_head(self, i: int, z_above, *state):
        # Layer i's whole latent [z_i^BU, z_i^TD]: the two heads' raw means, then their raw scales, BU first.
        (mb, sb), (mt, st) = (raw.chunk(2, dim=1) for raw in self._gen_raw(i, z_above, *state)[:2])
        return torch.cat([mb, mt], 1), torch.cat([sb, st], 1)

    def prior(self, i: int, z_above, h_above):
        (mu_b, sig_b), (mu_t, sig_t), h, _ = self._gen(i, z_above, h_above)
        return (torch.cat([mu_b, mu_t], 1), torch.cat([sig_b, sig_t], 1)), h

    def decode(self, z, h):
        if self.conv:
            return self.out(self._down(0, z, h)[0])
        return self.px(z if h is None else torch.cat([z, h], 1))[0]

    def _bottom_up(self, x):
        """Bottom-up pass: per layer i < L-1 the BU posterior (z, mu, sigma) and the features the TD
        posterior reads; and the top layer's (z, mu, sigma)."""
        ms, q_bu, feats = self.cfg.min_scale, [], []
        if self.conv:
            xb = xt = x
            aux = ()
            for i in range(self.depth):
                hb = _chain(self.q_bu[i], xb, aux)[0]
                ht = _chain(self.q_td[i], xt, [hb] * len(self.q_td[i]))[0]
                top = i == self.depth - 1
                mu, sigma = split_gaussian(self.q_head_bu[i](self.q_top(torch.cat([hb, ht], 1)) if top else hb), ms)
                q_bu.append((_sample(mu, sigma), mu, sigma))
                feats.append(ht)
                xb, xt, aux = q_bu[-1][0], ht, [torch.cat([hb, ht], 1)] * self.stages[i].blocks
            return q_bu[:-1], feats, q_bu[-1]
        for i, net in enumerate(self.bu):
            out, h = net(x if i == 0 else torch.cat([feats[-1], q_bu[-1][0]], 1))
            mu, sigma = split_gaussian(out, ms)
            q_bu.append((_sample(mu, sigma), mu, sigma))
            feats.append(h)
        return q_bu[:-1], feats, q_bu[-1]

    def _top_down(self, x) -> tuple:
        """The plain forward of x [N, ...]: Terms, and per generator layer (top first) the inputs
        (i, z_{i+1} = [BU, TD] (the top: z_L), the (mu, sigma) of the posteriors that drew it, z_i,
        the state of layer i+1: h_{i+1} or the block outputs, computed from the real samples above)."""
        ms, L = self.cfg.min_scale, self.depth
        q_bu, d, (z, mu, sigma) = self._bottom_up(x)
        log_q, log_p, q_mean, layers = [None] * L, [None] * L, [None] * L, []
        log_q[-1], log_p[-1], q_mean[-1] = gaussian_logprob(z, mu, sigma), std_normal_logprob(z), mu
        h = None
        for i in reversed(range(L - 1)):  # top-down
            state_above = self._state(h)
            (mu_b, sig_b), (mu_t, sig_t), h, g = self._gen(i, z, h)
            # TD posterior: ResNet, the merge block of the TD features and the generative features g;
            # MLP, a head on the generative features h_i and the BU features.
            if self.conv:
                out = self.q_head_td[i](self.merge[i](d[i], g))
            else:
                out = self.td[i](torch.cat([h, d[i]], 1))[0]
            mu_td, sig_td = split_gaussian(out, ms)
            z_td = _sample(mu_td, sig_td)
            z_bu, mu_bu, sig_bu = q_bu[i]
            log_q[i] = gaussian_logprob(z_bu, mu_bu, sig_bu) + gaussian_logprob(z_td, mu_td, sig_td)
            z_i = torch.cat([z_bu, z_td], 1)
            log_p[i] = gaussian_logprob(z_bu, mu_b, sig_b) + gaussian_logprob(z_td, mu_t, sig_t)
            layers.append((i, z, (mu, sigma), z_i, state_above))
            q_mean[i] = torch.cat([mu_bu, mu_td], 1)
            z, mu, sigma = z_i, q_mean[i], torch.cat([sig_bu, sig_td], 1)
        return Terms(self.likelihood.logprob(self.decode(z, h), x), log_q, log_p, q_mean), layers
