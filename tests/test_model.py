"""The stacked hierarchical VAE: densities, shapes, parameter counts, OU smoothing wiring, IW bounds."""

import math

import pytest
import torch
import torch.nn as nn

from hvae_fast.models.baselines import BIVA, LadderVAE
from hvae_fast.models.ladder import TopDownLadder
from hvae_fast.config import METHODS, PRESETS, ModelConfig
from hvae_fast.distributions import Terms, gaussian_logprob, repeat_batch, split_gaussian, std_normal_logprob
from hvae_fast.errors import HVAEError
from hvae_fast.models.model import MODELS, HierarchicalVAE, OUSmoothing, build_model, count_parameters
from hvae_fast.models.stack import StackedVAE
from hvae_fast.models.objectives import elbo_loss, iw_bound, training_loss
from hvae_fast.ops.ou import BACKENDS

TORCH = BACKENDS["torch"]


def tiny_mlp(L=3):
    return HierarchicalVAE(ModelConfig(arch="mlp", latent_sizes=(6, 5, 4)[:L], hidden_sizes=(16, 12, 8)[:L]), (1, 6, 6))


def tiny_resnet(skip=False, likelihood="bernoulli", shape=(1, 8, 8), stride=2):
    cfg = ModelConfig(arch="resnet", num_layers=3, channels=8, blocks=1, data_blocks=1, latent_channels=2,
                      latent_stride=stride, skip=skip, likelihood=likelihood, n_mix=2)
    return HierarchicalVAE(cfg, shape)


def binary(B, shape=(1, 6, 6), seed=0):
    return torch.bernoulli(torch.full((B, *shape), 0.3), generator=torch.Generator().manual_seed(seed))


def test_gaussian_logprob_and_prior_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64) + 0.1
    want = torch.distributions.Normal(mu, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_logprob(x, mu, sigma), want, atol=1e-12)
    want0 = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(std_normal_logprob(x), want0, atol=1e-12)


def test_split_gaussian_halves_the_channels_and_floors_sigma():
    out = torch.tensor([[[0.5], [-2.0], [-30.0], [1.0]]])  # [1, 4, 1]: mu = (0.5, -2), raw = (-30, 1)
    mu, sigma = split_gaussian(out, 0.01)
    assert torch.equal(mu, out[:, :2])
    torch.testing.assert_close(sigma, torch.log1p(torch.exp(out[:, 2:])) + 0.01)
    assert sigma[0, 0, 0] >= 0.01  # a very negative raw scale still leaves sigma at min_scale


def test_registry_builds_every_method_from_one_base():
    assert tuple(MODELS) == METHODS  # the config's methods and the registry agree
    assert MODELS["vae"] is MODELS["hvae"] is MODELS["iwae"] is HierarchicalVAE
    assert (MODELS["lvae"], MODELS["biva"]) == (LadderVAE, BIVA)
    assert MODELS["ladder"] is TopDownLadder
    cfg = ModelConfig(arch="mlp", latent_sizes=(4, 3), hidden_sizes=(8, 8))
    for method in METHODS:
        if method == "ladder":  # convolutional only (tests/test_ladder_vdvae.py)
            with pytest.raises(HVAEError, match="--method ladder is convolutional"):
                build_model(method, cfg, (1, 6, 6))
            continue
        m = build_model(method, cfg, (1, 6, 6))
        assert type(m) is MODELS[method] and isinstance(m, StackedVAE) and m.depth == 2
        assert m.image_shape == (1, 6, 6) and m.z_shapes == [(4,), (3,)]
    with pytest.raises(HVAEError, match="unknown method 'vdvae': choose one of vae, hvae, iwae, lvae, biva, ladder"):
        build_model("vdvae", cfg, (1, 6, 6))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg, shape, msg", [
    (ModelConfig(arch="mlp", latent_sizes=(4, 3), hidden_sizes=(8,)), (1, 6, 6), "one entry per stochastic layer"),
    (ModelConfig(arch="mlp", latent_sizes=(), hidden_sizes=()), (1, 6, 6), "at least one stochastic layer"),
    (ModelConfig(arch="resnet", num_layers=2, latent_stride=2), (1, 6, 6), "not divisible by 2 \\* latent_stride = 4"),
    (ModelConfig(arch="transformer"), (1, 6, 6), "unknown architecture 'transformer'"),
])
def test_every_model_checks_its_shapes_in_the_shared_base(method, cfg, shape, msg):
    with pytest.raises(HVAEError, match=msg):
        build_model(method, cfg, shape)


@pytest.mark.parametrize("make,x", [(tiny_mlp, binary(5)), (lambda: tiny_resnet(), binary(5, (1, 8, 8))),
                                    (lambda: tiny_resnet(True, "logistic", (3, 8, 8), 1),
                                     torch.randint(0, 256, (5, 3, 8, 8)).float() / 127.5 - 1)])
def test_terms_shapes_and_elbo_identity(make, x):
    torch.manual_seed(0)
    m = make()
    t = m(x)
    L = m.depth
    assert t.log_px.shape == (5,) and len(t.log_q) == len(t.log_p) == len(t.q_mean) == L
    assert all(v.shape == (5,) for v in t.log_q + t.log_p)
    assert torch.allclose(t.log_weight, t.log_px - sum(t.kl), atol=1e-4)
    assert m.sample(3).shape == (3, *x.shape[1:])
    # The smoothed forward exists for every architecture and keeps the same structure.
    ts = m(x, OUSmoothing(0.8, 3, TORCH))
    assert ts.log_weight.shape == (5,) and torch.isfinite(ts.log_weight).all()


def _forward_pair(m, x, rho, K, target="mean-std"):
    torch.manual_seed(123)
    plain = m(x)
    torch.manual_seed(123)
    smooth = m(x, OUSmoothing(rho, K, TORCH, target))
    return plain, smooth


@pytest.mark.parametrize("target", ["mean-std", "ratio"])
def test_rho_one_gives_the_plain_vae_loss_and_gradients(target):
    # rho = 1 makes every correlated sample equal to z, so the smoothed ELBO and its gradients
    # equal the plain ones; the only difference allowed is float32 rounding of the K-average
    # (tolerance 1e-5 relative).
    m = tiny_mlp()
    x = binary(8)
    plain, smooth = _forward_pair(m, x, 1.0, 5, target)
    lp, _ = elbo_loss(plain)
    ls, _ = elbo_loss(smooth)
    assert torch.allclose(lp, ls, rtol=1e-5)
    gp = torch.autograd.grad(lp, list(m.parameters()))
    gs = torch.autograd.grad(ls, list(m.parameters()))
    for a, b in zip(gp, gs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_smoothing_touches_only_the_intermediate_generator_layers():
    # The likelihood p(x|z_1), the prior p(z_L) and the inference network are not smoothed: with the
    # same posterior samples those terms are identical; the intermediate p(z_i|z_{i+1}) change.
    m = tiny_mlp()
    x = binary(8)
    plain, smooth = _forward_pair(m, x, 0.5, 4)
    assert torch.equal(plain.log_px, smooth.log_px)
    assert torch.equal(plain.log_p[-1], smooth.log_p[-1])
    for a, b in zip(plain.log_q, smooth.log_q):
        assert torch.equal(a, b)
    for a, b in zip(plain.log_p[:-1], smooth.log_p[:-1]):
        assert not torch.allclose(a, b)


def test_smoothed_layer_matches_a_direct_computation():
    # Layer 0's smoothed log-density recomputed by hand from the same noise: K correlated samples,
    # the generator run on each, mean and std averaged, Gaussian log-density (float64, 1e-10).
    m = tiny_mlp(2).double()
    x = binary(4).double()
    torch.manual_seed(7)
    zs, mus, sigmas, _ = m.encode(x)
    seed_state = torch.get_rng_state()
    ou = OUSmoothing(0.7, 3, TORCH)
    lp = m.generator_logprob(0, zs[1], zs[0], None, ou, (mus[1], sigmas[1]))
    torch.set_rng_state(seed_state)
    seed = ou.seed()
    eps = TORCH.correlated_noise(seed, 3, zs[1].shape, dtype=torch.float64)
    outs = []
    for k in range(3):
        zk = 0.7 * zs[1] + 0.3 * mus[1] + sigmas[1] * math.sqrt(1 - 0.49) * eps[k]
        outs.append(m.gen[0](zk)[0])
    mu_k = torch.stack([o[:, :6] for o in outs])
    sd_k = torch.nn.functional.softplus(torch.stack([o[:, 6:] for o in outs])) + m.cfg.min_scale
    want = torch.distributions.Normal(mu_k.mean(0), sd_k.mean(0)).log_prob(zs[0]).sum(1)
    assert torch.allclose(lp, want, atol=1e-10)


def test_gradients_reach_the_original_generator_weights_through_smoothing():
    m = tiny_mlp()
    loss, _ = training_loss(m, binary(6), "hvae", OUSmoothing(0.9, 5, TORCH), 1.0, 0.0, 1)
    loss.backward()
    for net in list(m.gen) + list(m.enc) + [m.px]:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_preset_parameter_counts_are_within_ten_percent_of_the_paper():
    for name in ("cifar10-resnet-3", "cifar10-resnet-4", "cifar10-resnet-6"):
        p = PRESETS[name]
        n = count_parameters(build_model("hvae", p.model, (3, 32, 32)))
        assert abs(n / p.paper_params - 1) < 0.10, (name, n)


class LinearGaussian(nn.Module):
    """z ~ N(0, 1), x | z ~ N(a z + b, s^2), q(z | x) = N(c x + d, t^2): log p(x) is exact."""

    a, b, s, c, d, t = 1.5, 0.3, 0.7, 0.4, -0.1, 0.9

    def forward(self, x, ou=None, k=1):
        x = repeat_batch(x, k)
        mu = self.c * x + self.d
        sig = torch.full_like(x, self.t)
        z = mu + sig * torch.randn_like(x)
        log_q = gaussian_logprob(z, mu, sig)
        log_px = gaussian_logprob(x, self.a * z + self.b, torch.full_like(x, self.s))
        return Terms(log_px, [log_q], [std_normal_logprob(z)], [mu])

    def exact(self, x):
        return gaussian_logprob(x, torch.full_like(x, self.b), torch.full_like(x, math.sqrt(self.a ** 2 + self.s ** 2)))


def test_iw_bound_converges_to_the_exact_log_likelihood():
    # On the linear-Gaussian model log p(x) is known in closed form. The IW bound with L = 5000,
    # computed in chunks of 700, lies below it on average and within 0.01 nats of it; the L = 1
    # bound (the ELBO) is clearly lower (its gap is the KL to the true posterior, ~0.2 nats here).
    torch.manual_seed(0)
    m = LinearGaussian()
    x = torch.randn(200, 1, dtype=torch.float64) * 1.6 + 0.3
    exact = m.exact(x)
    b5000 = iw_bound(m, x, 5000, chunk=700).double()
    b1 = iw_bound(m, x, 1).double()
    gap = (exact - b5000).mean().item()
    assert -0.002 < gap < 0.01
    assert (exact - b1).mean().item() > 0.1


def test_iw_bound_is_above_the_elbo_and_increases_with_L():
    # A briefly trained tiny model: the mean IW bound over 64 examples is non-decreasing in L
    # (1, 10, 100) and L = 1 matches the ELBO of the same samples in expectation (within 3 nats
    # averaged over 64 examples x 20 draws).
    torch.manual_seed(0)
    m = tiny_mlp()
    x = binary(64, seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = training_loss(m, x, "vae", None, 1.0, 0.0, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    torch.manual_seed(1)
    b = {L: iw_bound(m, x, L).mean().item() for L in (1, 10, 100)}
    with torch.no_grad():
        elbo = torch.stack([m(x).log_weight for _ in range(20)]).mean().item()
    assert b[1] <= b[10] <= b[100]
    assert abs(b[1] - elbo) < 3.0
    assert b[100] > elbo


def test_optional_inference_smoothing():
    # Off by default; when on, q(z_{i+1}|z_i) for i >= 1 is smoothed too, q(z_1|x) never is.
    # Layer 2's posterior mean depends only on the (shared) z_1 sample: at rho = 1 the K identical
    # samples average to the plain posterior mean (float32 rounding only, 1e-6); at rho = 0.5 it moves.
    m = tiny_mlp()
    x = binary(6)
    torch.manual_seed(5)
    plain = m(x)
    torch.manual_seed(5)
    same = m(x, OUSmoothing(1.0, 4, TORCH, smooth_inference=True))
    assert torch.equal(same.q_mean[0], plain.q_mean[0]) and torch.equal(same.log_q[0], plain.log_q[0])
    assert torch.allclose(same.q_mean[1], plain.q_mean[1], atol=1e-6)
    torch.manual_seed(5)
    smooth = m(x, OUSmoothing(0.5, 4, TORCH, smooth_inference=True))
    assert torch.equal(smooth.log_q[0], plain.log_q[0])
    assert not torch.allclose(smooth.q_mean[1], plain.q_mean[1], atol=1e-3)
    assert torch.isfinite(smooth.log_weight).all()


def test_recompute_gives_the_same_gradients_and_saves_less():
    # --ou-recompute rebuilds the K*B generator activations in backward: same loss and gradients
    # (the generator nets are deterministic; float32 reassociation only, 1e-6), fewer saved bytes.
    from hvae_fast.experiments.memory import SavedTensorCounter

    m = tiny_resnet()
    x = binary(4, (1, 8, 8))
    grads, saved = [], []
    for recompute in (False, True):
        torch.manual_seed(9)
        with SavedTensorCounter() as c:
            loss, _ = training_loss(m, x, "hvae", OUSmoothing(0.8, 4, TORCH, recompute=recompute), 1.0, 0.0, 1)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
        saved.append(c.bytes)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert saved[1] < 0.8 * saved[0]


def test_config_activation_names_are_the_nets_activations():
    from hvae_fast import config
    from hvae_fast.models import nets

    assert set(config.ACTIVATIONS) == set(nets.ACTIVATIONS)
