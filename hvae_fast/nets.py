"""Building blocks: the MLP and ResNet nets that sit between stochastic layers."""

from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """in_dim -> ``layers`` deterministic layers of ``hidden`` units -> out_dim. [N, *in_shape] -> [N, *out_shape]."""

    def __init__(self, in_shape, hidden: int, out_shape, act: str = "tanh", layers: int = 2):
        super().__init__()
        in_dim, out_dim = int(torch.Size(in_shape).numel()), int(torch.Size(out_shape).numel())
        self.out_shape = tuple(out_shape)
        body = []
        for j in range(layers):
            body += [nn.Linear(in_dim if j == 0 else hidden, hidden), activation(act)]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x):
        h = self.body(x.flatten(1))
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


def _halvings(scale) -> int:
    """log2 of a resampling factor 2^n or 1/2^n, as a signed count (+ up, - down)."""
    n = 0
    while scale > 1:
        scale, n = scale / 2, n + 1
    while scale < 1:
        scale, n = scale * 2, n - 1
    if scale != 1:
        raise ValueError(f"resampling factors are powers of two, got {scale}")
    return n


def _resample(ch: int, n: int) -> list:
    """|n| (ELU, stride-2 conv) pairs: transposed (x2 each) for n > 0, strided (/2 each) for n < 0."""
    def conv():
        return nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1) if n > 0 else nn.Conv2d(ch, ch, 3, padding=1, stride=2)

    return [m for _ in range(abs(n)) for m in (nn.ELU(), conv())]


class ConvNet(nn.Module):
    """[N, in_ch, H, W] -> [N, out_ch, H * scale_in * scale_out, W * ...] through ``blocks`` ResBlocks of ``ch`` maps.

    The input is resampled by ``scale_in`` (a power of two, or 1/power of two) before the blocks and
    by ``scale_out`` after them: the blocks run at H * scale_in. Downsampling uses stride-2
    convolutions, upsampling stride-2 transposed convolutions. Returns (output, the features the
    head reads: [N, ch, H * scale_in * scale_out, ...]).
    """

    def __init__(self, in_ch, ch, out_ch, blocks, scale_in=1, scale_out=1):
        super().__init__()
        n_in = _halvings(scale_in)
        # A first downsampling is folded into the stem conv (the image reads at stride 2).
        stem = [nn.Conv2d(in_ch, ch, 3, padding=1, stride=2 if n_in < 0 else 1)]
        self.stem = nn.Sequential(*stem, *_resample(ch, n_in + 1 if n_in < 0 else n_in))
        self.blocks = nn.Sequential(*[ResBlock(ch) for _ in range(blocks)])
        self.post = nn.Sequential(*_resample(ch, _halvings(scale_out)))
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x):
        h = self.post(self.blocks(self.stem(x)))
        return self.head(h), h
