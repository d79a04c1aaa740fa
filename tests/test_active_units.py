"""The active-unit count measures Cov_x(E_q[u | x]), not the posterior's sampling noise (issue 22).

A ladder's collapsed layer has q = p(z_i | z_{i+1}), whose mean moves with the sample above: averaged
over S draws per x, that noise alone has variance Var(mu | x) / S across examples, over the 0.01
threshold for S = 10 and Var >= 0.1. The estimator subtracts the within-x variance.
"""

from types import SimpleNamespace

import pytest
import torch

from hvae_fast.training.evaluate import active_units

D = 50  # units per layer


class NoisyMeans(torch.nn.Module):
    """q_mean of three layers for inputs x [S*B, 1] (S draws of B examples, sample-major):
    signal: x-dependent, variance 1 over x, plus noise of std 0.5 per draw (all active);
    noise: std 1 per draw, independent of x (none active: a collapsed ladder layer);
    weak: x-dependent with variance 0.004 over x (< 0.01) plus noise of std 0.5 (none active)."""

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        n = x.shape[0]
        sig = x[:, :1].double().expand(n, D)
        noise = lambda s: s * torch.randn(n, D, generator=self.g, dtype=torch.float64)  # noqa: E731
        return SimpleNamespace(q_mean=[sig + noise(0.5), noise(1.0), 0.004 ** 0.5 * sig + noise(0.5)])


def test_sampling_noise_is_not_counted_as_activity():
    torch.manual_seed(1)
    batches = [torch.randn(500, 1) for _ in range(10)]  # 5,000 examples, x ~ N(0, 1)
    # standard errors of the estimated variances (5,000 examples, S = 10): about 0.02 for the
    # signal layer, 0.002 for the noise layer and 0.0005 for the weak one, against the 0.01 threshold
    assert active_units(NoisyMeans(), batches, "cpu", samples=10) == [D, 0, 0]


def test_without_the_correction_the_noise_would_count():
    # the per-x average's variance over x alone: 1/10 for the noise layer, 0.004 + 0.025 for the weak one
    torch.manual_seed(1)
    x = torch.randn(5000, 1)
    q = NoisyMeans()(x.repeat(10, 1)).q_mean
    naive = [int((m.view(10, 5000, D).mean(0).var(0, unbiased=False) > 0.01).sum()) for m in q]
    assert naive == [D, D, D]


def test_one_sample_cannot_separate_the_noise():
    with pytest.raises(ValueError, match="samples >= 2"):
        active_units(NoisyMeans(), [torch.randn(4, 1)], "cpu", samples=1)
