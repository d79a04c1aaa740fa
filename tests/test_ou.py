"""The OU reference path: sampler moments, Mehler identities, limits in rho, and backend selection."""

import math

import pytest
import torch

from hvae_fast.errors import HVAEError
from hvae_fast.ops.ou import (BACKENDS, backend_status, check_ou_args, correlated_samples_reference,
                          gaussian_head_reference, get_backend, torch_correlated_noise)

torch_backend = BACKENDS["torch"]


def samples(z, mu, sigma, rho, K, seed=0):
    return torch_backend.correlated_samples(z, mu, sigma, rho, K, seed)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9])
def test_sampler_mean_and_std(rho):
    # z' = rho z + (1-rho) mu + sigma sqrt(1-rho^2) eps has mean rho z + (1-rho) mu and std
    # sigma sqrt(1-rho^2). K = 20000 draws per element: the sample mean's standard error is
    # sd / sqrt(K) < 0.008 * sd, so 5 standard errors is our tolerance; the std's relative
    # standard error is ~1/sqrt(2K) = 0.005, tolerance 3%.
    g = torch.Generator().manual_seed(1)
    z, mu = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    sigma = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    K = 20000
    zp = samples(z, mu, sigma, rho, K, seed=7)
    assert zp.shape == (K, 3, 4)
    sd = sigma * math.sqrt(1 - rho ** 2)
    mean = rho * z + (1 - rho) * mu
    assert ((zp.mean(0) - mean).abs() <= 5 * sd / math.sqrt(K)).all()
    assert torch.allclose(zp.std(0), sd, rtol=0.03)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8, 0.95])
def test_mehler_identities(rho):
    # With mu = 0, sigma = 1 the correlated sample is the OU semigroup's w-draw:
    # U_rho f(z) = E f(rho z + sqrt(1-rho^2) w). Exact: U_rho[z] = rho z and
    # U_rho[z^2] = rho^2 z^2 + 1 - rho^2 (Mehler). Monte Carlo with K = 200000 draws; tolerance
    # 5 standard errors of each estimator (Var z'^2 = 2 v^2 + 4 m^2 v with m = rho z, v = 1-rho^2).
    z = torch.tensor([-2.0, -0.5, 0.0, 1.0, 2.5], dtype=torch.float64)
    K = 200_000
    zp = samples(z, torch.zeros_like(z), torch.ones_like(z), rho, K, seed=3)
    v = 1 - rho ** 2
    m = rho * z
    se1 = math.sqrt(max(v, 1e-12) / K)
    assert ((zp.mean(0) - rho * z).abs() <= 5 * se1 + 1e-12).all()
    se2 = torch.sqrt((2 * v ** 2 + 4 * m ** 2 * v) / K)
    assert ((zp.pow(2).mean(0) - (rho ** 2 * z ** 2 + 1 - rho ** 2)).abs() <= 5 * se2 + 1e-12).all()


def test_mean_of_smoothed_function_is_preserved():
    # E[U_rho f] = E[f] under the standard Gaussian: draw z ~ N(0,1) and one correlated sample
    # each; z' is again N(0,1), so E f(z') = E f(z) for f = z^4 (= 3). n = 400000, tolerance
    # 5 standard errors (sd of z^4 is sqrt(96)).
    g = torch.Generator().manual_seed(5)
    z = torch.randn(400_000, generator=g, dtype=torch.float64)
    zp = samples(z, torch.zeros_like(z), torch.ones_like(z), 0.6, 1, seed=9)[0]
    assert abs(zp.pow(4).mean().item() - 3.0) < 5 * math.sqrt(96 / 4e5)


def test_rho_one_is_identity_and_rho_zero_gives_the_mean():
    g = torch.Generator().manual_seed(0)
    z, mu, sigma = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.rand(5, 6, generator=g) + 0.1
    assert torch.equal(samples(z, mu, sigma, 1.0, 4), z.expand(4, 5, 6))
    # rho = 0: z' = mu + sigma eps, independent of z; its average over K = 100000 is mu within
    # 5 standard errors sigma / sqrt(K).
    zp = samples(z, mu, sigma, 0.0, 100_000)
    assert ((zp.mean(0) - mu).abs() <= 5 * sigma / math.sqrt(1e5)).all()
    zp2 = samples(z + 100.0, mu, sigma, 0.0, 3, seed=4)
    assert torch.allclose(zp2, samples(z, mu, sigma, 0.0, 3, seed=4))


def test_seeded_noise_is_reproducible_and_matches_materialised_noise():
    z = torch.randn(4, 3)
    a = samples(z, z, torch.ones_like(z), 0.5, 3, seed=11)
    b = samples(z, z, torch.ones_like(z), 0.5, 3, seed=11)
    c = samples(z, z, torch.ones_like(z), 0.5, 3, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch_correlated_noise(11, 3, z.shape)
    assert torch.allclose(a, correlated_samples_reference(z, z, torch.ones_like(z), 0.5, eps))


def test_gaussian_head_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    K, B, D = 4, 3, 5
    mean_raw = torch.randn(K, B, D, generator=g, dtype=torch.float64)
    scale_raw = torch.randn(K, B, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    sig = torch.nn.functional.softplus(scale_raw) + 1e-3
    want = torch.distributions.Normal(mean_raw.mean(0), sig.mean(0)).log_prob(target).sum(1)
    assert torch.allclose(gaussian_head_reference(mean_raw, scale_raw, target, "mean-std"), want, atol=1e-12)
    mu_r = sig.mean(0) * (mean_raw / sig).mean(0)
    want_r = torch.distributions.Normal(mu_r, sig.mean(0)).log_prob(target).sum(1)
    assert torch.allclose(gaussian_head_reference(mean_raw, scale_raw, target, "ratio"), want_r, atol=1e-12)
    # K = 1: both targets reduce to the plain Gaussian head.
    one = gaussian_head_reference(mean_raw[:1], scale_raw[:1], target, "ratio")
    assert torch.allclose(one, torch.distributions.Normal(mean_raw[0], sig[0]).log_prob(target).sum(1), atol=1e-12)


@pytest.mark.parametrize("rho,K", [(-0.1, 5), (1.5, 5), (float("nan"), 5), (0.5, 0), (0.5, -2)])
def test_bad_rho_or_K_is_a_clear_error(rho, K):
    with pytest.raises(HVAEError, match="rho|K"):
        check_ou_args(rho, K)


def test_names_moved_below_ou_stay_importable_from_ou():
    """The backend contract and the Gaussian log-density live below ou (no import cycle with the
    backends); ou re-exports the very same objects for the code and tests that import them from it."""
    from hvae_fast.ops import backends, ou
    from hvae_fast import distributions

    assert ou.Backend is backends.Backend and ou.check_ou_args is backends.check_ou_args
    assert ou.OU_TARGETS is backends.OU_TARGETS == ("mean-std", "ratio")
    assert ou.BACKEND_NAMES is backends.BACKEND_NAMES and set(BACKENDS) <= set(backends.BACKEND_NAMES)
    assert ou.gaussian_logprob is distributions.gaussian_logprob
    assert isinstance(BACKENDS["torch"], backends.Backend)


def test_backend_selection_reports_and_logs(caplog, monkeypatch):
    from hvae_fast.ops import autotune

    st = backend_status("cpu")
    assert set(st) == {"triton", "cuda", "cpp", "torch"}
    assert st["torch"][0] and not st["cuda"][0] and st["cuda"][1]
    monkeypatch.setattr(autotune, "_AUTO", {})
    with caplog.at_level("INFO", logger="hvae_fast.ops.autotune"):
        b = get_backend("auto", "cpu")
    assert b.name == "auto"  # per op and shape class: tests/test_autotune.py
    assert "auto on cpu, per op and shape class among" in caplog.text
    with pytest.raises(HVAEError, match="not available"):
        get_backend("cuda", "cpu")
    with pytest.raises(HVAEError, match="unknown OU backend"):
        get_backend("fast", "cpu")
