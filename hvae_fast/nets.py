"""Building blocks: the MLP and ResNet nets that sit between stochastic layers."""

from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """in_dim -> two deterministic layers of `hidden` units -> out_dim. [N, *in_shape] -> [N, *out_shape]."""

    def __init__(self, in_shape, hidden: int, out_shape, act: str = "tanh"):
        super().__init__()
        in_dim, out_dim = int(torch.Size(in_shape).numel()), int(torch.Size(out_shape).numel())
        self.out_shape = tuple(out_shape)
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), activation(act), nn.Linear(hidden, hidden), activation(act))
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x, skip=None):
        h = self.body(x.flatten(1))
        if skip is not None:
            h = h + skip
        return self.head(h).view(-1, *self.out_shape), h


class ResBlock(nn.Module):
    """x + conv3x3(elu(conv3x3(elu(x)))), shape-preserving: [N, C, H, W]."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.ELU()

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class ConvNet(nn.Module):
    """[N, in_ch, H, W] -> [N, out_ch, H * up / down, W * up / down] through `blocks` ResBlocks of `ch` maps.

    ``down``/``up`` are powers of two, applied by stride-2 convolutions before the blocks and
    stride-2 transposed convolutions after them. Returns (output, features before the head); the
    features feed the HVAE+ skip connections.
    """

    def __init__(self, in_ch, ch, out_ch, blocks, down=1, up=1):
        super().__init__()
        stem = [nn.Conv2d(in_ch, ch, 3, padding=1, stride=2 if down > 1 else 1)]
        d = down // 2
        while d > 1:
            stem += [nn.ELU(), nn.Conv2d(ch, ch, 3, padding=1, stride=2)]
            d //= 2
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.Sequential(*[ResBlock(ch) for _ in range(blocks)])
        ups = []
        u = up
        while u > 1:
            ups += [nn.ELU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
            u //= 2
        self.up = nn.Sequential(*ups)
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x, skip=None):
        h = self.stem(x)
        if skip is not None:
            h = h + skip
        h = self.up(self.blocks(h))
        return self.head(h), h
