"""Training with each available fused OU backend follows the `torch` backend's loss curve.

The backends draw their OU noise from different generators, so their curves differ by Monte
Carlo noise only. The tolerance is calibrated in the same run: a `torch` run whose OU noise comes
from another stream (a control with the same statistics) gives the natural spread between two
equally valid curves; each fused backend must stay within 3x that spread (+0.5 nats).
"""

import pytest
import torch

from hvae_fast.config import ModelConfig
from hvae_fast.models.model import HierarchicalVAE, OUSmoothing
from hvae_fast.models.objectives import training_loss
from hvae_fast.ops.ou import BACKENDS, Backend, backend_status, get_backend

STEPS, WINDOW = 50, 15


def loss_curve(backend: Backend, seed_shift: int = 0):
    torch.manual_seed(0)
    m = HierarchicalVAE(ModelConfig(arch="mlp", latent_sizes=(8, 6, 4), hidden_sizes=(48, 32, 16)), (1, 8, 8))
    g = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.rand(256, 1, 8, 8, generator=g) * 0.6)
    ou = OUSmoothing(0.7, 5, backend)
    if seed_shift:
        ou.seed = lambda: int(torch.randint(0, 2**62, (1,)).item()) + seed_shift
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(STEPS):
        x = data[(step * 32) % 256:(step * 32) % 256 + 32]
        loss, _ = training_loss(m, x, "hvae", ou, 1.0, 0.0, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


FUSED_CPU = [n for n in ("cpp", "triton") if backend_status("cpu")[n][0]]


@pytest.mark.skipif(not FUSED_CPU, reason="no fused OU backend is available on CPU (see `hvae-fast info`)")
@pytest.mark.parametrize("name", FUSED_CPU)
def test_fused_backend_follows_the_torch_loss_curve(name):
    ref = loss_curve(BACKENDS["torch"])
    control = loss_curve(BACKENDS["torch"], seed_shift=12345)
    fused = loss_curve(get_backend(name, "cpu"))
    assert torch.isfinite(fused).all()
    assert fused[-WINDOW:].mean() < fused[:5].mean() - 5  # it learns
    spread = (control[-WINDOW:] - ref[-WINDOW:]).abs().mean().item()
    diff = (fused[-WINDOW:] - ref[-WINDOW:]).abs().mean().item()
    assert diff <= 3 * spread + 0.5, (diff, spread)
