"""Building blocks: the MLP and ResNet nets that sit between stochastic layers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def same_pad(x, k: int, s: int = 1):
    """Zero-pad x [N, C, H, W] as TensorFlow's 'SAME' does for a k x k window at stride s (extra row/column at the end)."""
    ph, pw = (max(0, (-(-n // s) - 1) * s + k - n) for n in x.shape[-2:])
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class WNConv(nn.Module):
    """Weight-normalised conv with TensorFlow 'SAME' padding, as in the BIVA authors' code:
    [N, cin, H, W] -> [N, cout, ceil(H / stride), ...], or [N, cout, H * stride, ...] when ``up``
    (a transposed conv, cropped by kernel - stride)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, up: bool = False):
        super().__init__()
        conv = (nn.ConvTranspose2d if up else nn.Conv2d)(cin, cout, k, stride)
        self.conv = nn.utils.parametrizations.weight_norm(conv, dim=1 if up else 0)
        self.k, self.s, self.up = k, stride, up

    def forward(self, x):
        k, s = self.k, self.s
        if self.up:
            y, a = self.conv(x), (k - s) // 2
            b = k - s - a
            return y[..., a:y.shape[-2] - b, a:y.shape[-1] - b]
        return self.conv(same_pad(x, k, s))


class GatedResBlock(nn.Module):
    """The BIVA authors' gated ResNet block (ELU): [N, cin, H, W] (+ aux [N, aux_ch, H * aux_ratio, ...])
    -> [N, ch, H / stride, ...] (H * stride when ``up``).

        y = conv1(act(x)) + conv_aux(act(aux));  (a, b) = conv2(act(y));  out = a * sigmoid(b) + x
    conv1 and conv2 have kernel k; conv2 carries the stride; conv_aux is 1x1 on an aux of the input's
    size, strided (transposed) on a larger (smaller) one. The residual is x (its first ch maps when
    cin > ch), average-pooled 3x3 when downsampling; there is none (and x is not activated) with
    ``residual=False``, when upsampling, or when ch > cin.
    """

    def __init__(self, cin: int, ch: int, k: int, stride: int = 1, up: bool = False, aux_ch: int = 0,
                 aux_ratio: float = 1, residual: bool = True):
        super().__init__()
        self.act, self.stride, self.pre_act = nn.ELU(), stride, residual
        self.residual = residual and ch <= cin and not (up and stride > 1)
        self.ch = ch
        self.conv1 = WNConv(cin, ch, k)
        self.conv2 = WNConv(ch, 2 * ch, k, stride, up=up and stride > 1)
        if not aux_ch:
            self.aux = None
        elif aux_ratio == 1:
            self.aux = WNConv(aux_ch, ch, 1)
        else:  # aux at another resolution: resample it by the ratio
            r = aux_ratio if aux_ratio > 1 else 1 / aux_ratio
            self.aux = WNConv(aux_ch, ch, k, int(r), up=aux_ratio < 1)

    def forward(self, x, aux=None):
        y = self.conv1(self.act(x) if self.pre_act else x)
        if self.aux is not None:
            y = y + self.aux(self.act(aux))
        a, b = self.conv2(self.act(y)).chunk(2, 1)
        y = a * torch.sigmoid(b)
        if self.residual:
            r = x[:, :self.ch]
            if self.stride > 1:
                r = F.avg_pool2d(same_pad(r, 3, self.stride), 3, self.stride)
            y = y + r
        return y
