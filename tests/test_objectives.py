"""Objectives: KL annealing, free bits, ELBO loss, IWAE, log-mean-exp, and the MC KL estimate."""

import math

import pytest
import torch

from hvae_fast.config import ModelConfig
from hvae_fast.distributions import Terms, gaussian_logprob
from hvae_fast.errors import HVAEError
from hvae_fast.models.model import HierarchicalVAE, OUSmoothing
from hvae_fast.models.objectives import (elbo_loss, free_bits_kl, iwae_loss, kl_weight, log_mean_exp, repeat_batch,
                                  training_loss)
from hvae_fast.ops.ou import BACKENDS


def test_kl_weight_schedule():
    assert [kl_weight(s, 10_000, 500_000) for s in (0, 9_999, 10_000, 260_000, 510_000, 10**7)] == [0, 0, 0, 0.5, 1, 1]
    assert kl_weight(0, 0, 0) == 1.0 and kl_weight(5, 10, 0) == 0.0 and kl_weight(10, 10, 0) == 1.0


def test_free_bits_clamp_gradient():
    kl = torch.tensor([0.2, 0.4], requires_grad=True)  # mean 0.3, below a floor of 0.5
    (g,) = torch.autograd.grad(free_bits_kl([kl], 0.5)[0], kl)
    assert torch.equal(g, torch.zeros(2))
    kl2 = torch.tensor([1.0, 2.0], requires_grad=True)  # mean 1.5, above: d mean / d kl_b = 1/B
    (g2,) = torch.autograd.grad(free_bits_kl([kl2], 0.5)[0], kl2)
    torch.testing.assert_close(g2, torch.full((2,), 0.5))


@pytest.mark.parametrize("whole", [[0.1, 0.3, 1.6, 2.0], [0.0, 0.2, 0.3, 0.9]])
def test_free_bits_over_shards_give_the_whole_batch_value_and_gradient(whole):
    """Two data-parallel shards of a batch whose layer-1 KL mean is above the floor (0.5) in the first
    case and below it in the second; in both, one shard's own mean sits on the other side of the floor,
    so a clamp of each shard's mean would give the wrong gradient. With the processes' mean the
    shards' losses average to the whole batch's, and their gradients concatenate to its gradient."""
    floor = 0.5
    kl = torch.tensor(whole, dtype=torch.float64, requires_grad=True)
    (ref,) = free_bits_kl([kl], floor)
    (g_ref,) = torch.autograd.grad(ref, kl)
    shards = [kl.detach()[:2].clone().requires_grad_(), kl.detach()[2:].clone().requires_grad_()]
    local = [s.mean().detach() for s in shards]
    global_mean = lambda t: (local[0] + local[1]).reshape(t.shape) / 2  # noqa: E731 - a 2-process all-reduce
    vals = [free_bits_kl([s], floor, global_mean)[0] for s in shards]
    grads = [torch.autograd.grad(v, s)[0] / 2 for v, s in zip(vals, shards)]  # DDP averages the processes' grads
    torch.testing.assert_close((vals[0] + vals[1]) / 2, ref)
    torch.testing.assert_close(torch.cat(grads), g_ref)
    naive = [torch.autograd.grad(torch.clamp(s.mean(), min=floor), s)[0] / 2 for s in shards]
    assert not torch.allclose(torch.cat(naive), g_ref)  # the case is one where a shard-local clamp is wrong


def fake_terms():
    return Terms(log_px=torch.tensor([-10.0, -12.0]), log_q=[torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])],
                 log_p=[torch.tensor([-2.0, -2.5]), torch.tensor([-3.5, -1.5])])


def test_elbo_loss_weights_and_floors_the_kl_terms():
    t = fake_terms()
    # KLs per layer: [1.0, 0.5] and [0.5, 0.5] -> batch means 0.75 and 0.5; mean log p(x) = -11.
    loss, bound = elbo_loss(t)
    assert loss.item() == pytest.approx(11 + 0.75 + 0.5)
    assert torch.allclose(bound, torch.tensor([-10 - 1.5, -12 - 1.0]))
    assert elbo_loss(t, beta=0.0)[0].item() == pytest.approx(11.0)
    # Free bits at 0.6 nats lifts the second layer's 0.5 to 0.6; the reported bound is unchanged.
    loss_fb, bound_fb = elbo_loss(t, free_bits=0.6)
    assert loss_fb.item() == pytest.approx(11 + 0.75 + 0.6) and torch.equal(bound_fb, bound)


def test_log_mean_exp_is_stable_and_exact():
    x = torch.tensor([[1000.0, -1000.0], [1000.0, -1001.0]], dtype=torch.float64)
    want = torch.tensor([1000.0, -1000 + math.log((1 + math.exp(-1)) / 2)], dtype=torch.float64)
    assert torch.allclose(log_mean_exp(x, 0), want, atol=1e-12)


def test_repeat_batch_is_sample_major():
    x = torch.arange(6.0).view(3, 2)
    r = repeat_batch(x, 2)
    assert r.shape == (6, 2) and torch.equal(r.view(2, 3, 2)[1], x)


def tiny():
    torch.manual_seed(0)
    return HierarchicalVAE(ModelConfig(arch="mlp", latent_sizes=(5, 3), hidden_sizes=(16, 8)), (1, 4, 4))


def test_hvae_with_kl_annealing_at_weight_zero_trains_the_likelihood_only():
    # Table 4's HVAE + KL annealing: at weight 0 the smoothed loss is -E log p(x|z) alone.
    m = tiny()
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, _ = training_loss(m, x, "hvae", OUSmoothing(0.9, 3, BACKENDS["torch"]), 0.0, 0.0, 1)
    torch.manual_seed(1)
    assert loss.item() == pytest.approx(-m(x).log_px.mean().item(), rel=1e-6)


def test_iwae_objective_rejects_free_bits_and_accepts_annealing():
    m = tiny()
    x = torch.bernoulli(torch.full((4, 1, 4, 4), 0.4))
    with pytest.raises(HVAEError, match="free-bits"):
        training_loss(m, x, "iwae", None, 1.0, 0.5, 5)
    loss, bound = iwae_loss(m, x, 5, beta=0.5)
    assert bound.shape == (4,) and torch.isfinite(loss)


def test_single_sample_kl_estimates_the_analytic_kl():
    # The per-layer KL is the single-sample estimate log q(z) - log p(z); for the top layer against
    # N(0, I) its mean over n = 200000 draws matches torch.distributions.kl_divergence within
    # 5 standard errors.
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.tensor([[0.7, -1.2, 0.1]]), torch.tensor([[0.4, 1.5, 0.9]])
    n = 200_000
    z = mu + sigma * torch.randn(n, 3, generator=g)
    est = gaussian_logprob(z, mu.expand(n, 3), sigma.expand(n, 3)) - gaussian_logprob(z, torch.zeros(n, 3), torch.ones(n, 3))
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)).sum()
    assert abs(est.mean().item() - exact.item()) < 5 * est.std().item() / math.sqrt(n)
