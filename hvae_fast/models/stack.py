"""``StackedVAE``: the base of every model (the vanilla stack, LVAE, BIVA).

It holds what they share: the image shape, the likelihood p(x|z_1), the per-layer latent and
feature shapes, the net factory for MLP / ResNet configs, and ``sample()``. A subclass builds its
nets in ``__init__`` and defines ``forward(x, ou) -> Terms``, ``prior`` (one generator layer) and
``decode`` (p(x|z_1)'s parameters); ``sample`` runs those top-down. The block OU smoothing re-runs
(``generator_head``), the inputs each generator layer reads in one posterior pass
(``generator_inputs``) and its parameters (``generator_parameters``) serve the smoothing and the
diagnostics (`gradvar`, `spectrum`) alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import HVAEError
from .likelihoods import make_likelihood
from .nets import MLP, ConvNet


class StackedVAE(nn.Module):
    """Shapes and likelihood of an L-layer stack; layers are indexed 0..L-1 bottom (z_1) to top (z_L).

    ``z_shapes[i]``: per-example shape of one latent of layer i ([D] for MLPs, [C, H, W] for ResNets);
    ``feat_shapes[i]``: shape of the features layer i's nets return (ResNets: at the latent
    resolution; their blocks run at image size / 2, latent_stride times finer); ``latent_shapes[i]``: the whole
    latent of layer i (a subclass whose layers hold several latents overrides it).
    """

    def __init__(self, cfg: ModelConfig, image_shape):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.likelihood = make_likelihood(cfg.likelihood, n_mix=cfg.n_mix)
        C, H, W = self.image_shape
        self.n_out = self.likelihood.num_params(C)
        L = cfg.depth
        if L < 1:
            raise HVAEError("a model needs at least one stochastic layer: pass --latent-sizes or --num-layers >= 1")
        if cfg.arch == "mlp":
            if len(cfg.latent_sizes) != len(cfg.hidden_sizes):
                raise HVAEError("latent_sizes and hidden_sizes must have one entry per stochastic layer")
            self.z_shapes = [(d,) for d in cfg.latent_sizes]
            self.feat_shapes = [(h,) for h in cfg.hidden_sizes]
        elif cfg.arch == "resnet":
            s = cfg.latent_stride
            if s & (s - 1):
                raise HVAEError(f"--latent-stride must be a power of two, got {s}: pass 1, 2, 4, ...")
            if H % (2 * s) or W % (2 * s):
                raise HVAEError(f"image size {H}x{W} is not divisible by 2 * latent_stride = {2 * s}")
            # The nets' blocks run at half the image size; latents (and the features nets return) at 1/s of that.
            hw = (H // (2 * s), W // (2 * s))
            self.z_shapes = [(cfg.latent_channels, *hw)] * L
            self.feat_shapes = [(cfg.channels, *hw)] * L
        else:
            raise HVAEError(f"unknown architecture {cfg.arch!r}: choose mlp or resnet")
        self.latent_shapes = list(self.z_shapes)

    def net(self, in_shape, i: int, out_ch: int, data: str = ""):
        """A net of layer i: in_shape -> (out_ch Gaussian/likelihood params, features of layer i).

        data="in": reads the image (downsamples); data="out": writes image-sized likelihood params.
        ResNet blocks run at image size / 2: a net upsamples a latent-resolution input by
        latent_stride before its blocks and downsamples by it after them.
        """
        cfg = self.cfg
        if cfg.arch == "mlp":
            out = (out_ch, *self.image_shape[1:]) if data == "out" else (out_ch,)
            return MLP(in_shape, cfg.hidden_sizes[i], out, cfg.activation, cfg.hidden_layers)
        s = cfg.latent_stride
        scale_in = 0.5 if data == "in" else s
        scale_out = 2 if data == "out" else 1 / s
        return ConvNet(in_shape[0], cfg.channels, out_ch, cfg.data_blocks if data else cfg.blocks, scale_in, scale_out)

    @property
    def depth(self) -> int:
        return len(self.latent_shapes)

    def prior(self, i: int, z_above, state):
        """Generator layer i < L-1: ((mu, sigma) of p(z_i | above), each [N, *latent_shapes[i]]), and
        the ``state`` (HVAE+: the latents above; BIVA: features; or None) it passes down to layer i-1
        and to ``decode``."""
        raise NotImplementedError

    def generator_head(self, i: int, z_above, *state):
        """Generator layer i on z_{i+1} [N, ...] and the state it reads [N, ...] (HVAE+: the latents
        above; ladders: the top-down state of the layer above): p(z_i | .)'s raw head (mean_raw,
        scale_raw), each [N, *latent_shapes[i]]; mu = mean_raw, sigma = softplus(scale_raw) + min_scale.
        This is the block OU smoothing re-runs on the K correlated samples of z_{i+1}."""
        raise NotImplementedError

    def generator_inputs(self, x) -> list:
        """One posterior pass over x [N, ...]: per generator layer, top first, (i, z_{i+1}, (mu, sigma)
        of the posterior that drew z_{i+1}, z_i, the state tuple ``generator_head`` reads)."""
        raise NotImplementedError

    def generator_parameters(self, i: int) -> list:
        """The parameters of generator layer i < L-1: those of the modules ``generator_head(i, ...)`` runs."""
        raise NotImplementedError

    def decode(self, z, state):
        """p(x | z_1)'s parameters [N, n_out, H, W] from z_1 and the state the lowest layer passed down."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = True):
        """n images from the generative model: [n, C, H, W] in the data range (means, or samples)."""
        dev = next(self.parameters()).device
        z, state = torch.randn((n, *self.latent_shapes[-1]), generator=generator, device=dev), None
        for i in reversed(range(self.depth - 1)):
            (mu, sigma), state = self.prior(i, z, state)
            z = mu + sigma * torch.randn(mu.shape, generator=generator, device=dev)
        params = self.decode(z, state)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
