"""The GEMM (and convolution) floor of a training step: the time of its matrix multiplies alone.

``record_products(model, run)`` runs ``run()`` once with forward hooks on every ``nn.Linear``,
``nn.Conv2d`` and ``nn.ConvTranspose2d`` of ``model`` and keeps each call's shapes (the K*B rows of the smoothed generator layers
included). ``Floor`` replays exactly those products on preallocated random tensors: per call the
forward product, the weight gradient and, where the layer's input needs a gradient, the input
gradient; nothing else (no bias, activation, loss, optimizer or Python model code). A step's
"x floor" is its time over this one's, measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Product:
    kind: str            # "linear" | "conv2d" | "conv_transpose2d"
    x_shape: tuple       # linear: (rows, in); conv2d: (N, C, H, W)
    w_shape: tuple       # the layer's weight
    input_grad: bool     # whether backward computes a gradient for the layer's input
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)


def record_products(model: nn.Module, run) -> list[Product]:
    """The Linear / Conv2d / ConvTranspose2d calls of one ``run()``, in call order."""
    calls, hooks = [], []

    def hook(mod, args, _out):
        x = args[0]
        if isinstance(mod, nn.Linear):
            calls.append(Product("linear", (x.numel() // x.shape[-1], x.shape[-1]), tuple(mod.weight.shape),
                                 x.requires_grad))
        else:
            kind = "conv_transpose2d" if isinstance(mod, nn.ConvTranspose2d) else "conv2d"
            calls.append(Product(kind, tuple(x.shape), tuple(mod.weight.shape), x.requires_grad,
                                 tuple(mod.stride), tuple(mod.padding)))

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


class Floor:
    """Calling it does the recorded products once: forward, weight gradient, input gradient."""

    def __init__(self, products: list[Product], device, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        self.work = []
        for p in products:
            x = torch.randn(p.x_shape, generator=g, dtype=dtype).to(device)
            w = torch.randn(p.w_shape, generator=g, dtype=dtype).to(device)
            if p.kind == "linear":
                dy = torch.randn((p.x_shape[0], p.w_shape[0]), generator=g, dtype=dtype).to(device)
            else:
                conv = F.conv2d if p.kind == "conv2d" else F.conv_transpose2d
                out = conv(x, w, stride=p.stride, padding=p.padding)
                dy = torch.randn(out.shape, generator=g, dtype=dtype).to(device)
            self.work.append((p, x, w, dy))
        self.flops = sum(self._flops(p) for p in products)

    @staticmethod
    def _flops(p: Product) -> int:
        """Multiply-adds x 2 of the forward product, times 3 with an input gradient, else 2."""
        if p.kind == "linear":
            fwd = 2 * p.x_shape[0] * p.x_shape[1] * p.w_shape[0]
        elif p.kind == "conv_transpose2d":  # each input pixel scatters a kxk window to every output map
            n, c, h, w = p.x_shape
            fwd = 2 * n * h * w * c * p.w_shape[1] * p.w_shape[2] * p.w_shape[3]
        else:
            n, c, h, w = p.x_shape
            ho = (h + 2 * p.padding[0] - p.w_shape[2]) // p.stride[0] + 1
            wo = (w + 2 * p.padding[1] - p.w_shape[3]) // p.stride[1] + 1
            fwd = 2 * n * ho * wo * p.w_shape[0] * c * p.w_shape[2] * p.w_shape[3]
        return fwd * (3 if p.input_grad else 2)

    def __call__(self):
        for p, x, w, dy in self.work:
            if p.kind == "linear":
                torch.mm(x, w.t())
                torch.mm(dy.t(), x)
                if p.input_grad:
                    torch.mm(dy, w)
            elif p.kind == "conv2d":
                F.conv2d(x, w, stride=p.stride, padding=p.padding)
                torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=p.stride, padding=p.padding)
                if p.input_grad:
                    torch.nn.grad.conv2d_input(x.shape, w, dy, stride=p.stride, padding=p.padding)
            else:  # y = conv_transpose2d(x, w) is the input gradient of conv2d(y, w): its gradients are that conv's
                F.conv_transpose2d(x, w, stride=p.stride, padding=p.padding)
                torch.nn.grad.conv2d_weight(dy, w.shape, x, stride=p.stride, padding=p.padding)
                if p.input_grad:
                    F.conv2d(dy, w, stride=p.stride, padding=p.padding)
