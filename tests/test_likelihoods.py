"""Tests for hvae_fast.models.likelihoods: Bernoulli and discretized-logistic-mixture heads."""

import math

import numpy as np
import pytest
import torch

from hvae_fast.errors import HVAEError
from hvae_fast.models.likelihoods import (
    LIKELIHOODS,
    bernoulli_logprob,
    bernoulli_mean,
    bernoulli_sample,
    bits_per_dim,
    dmol_logprob,
    dmol_mean,
    dmol_num_params,
    dmol_sample,
    make_likelihood,
)

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 256 pixel values in [-1, 1]


def random_params(n_mix, b=2, h=2, w=2, channels=3, seed=0, dtype=torch.float64,
                  mean_range=0.5, log_scale_range=(-0.5, 0.5)):
    """Decoder output in the documented layout [logits | means | log-scales | coeffs]."""
    g = torch.Generator().manual_seed(seed)
    k = channels * (channels - 1) // 2
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    lo, hi = log_scale_range
    return torch.cat([
        2.0 * torch.randn(b, n_mix, h, w, generator=g, dtype=dtype),
        mean_range * (2 * u(b, n_mix * channels, h, w) - 1),
        lo + (hi - lo) * u(b, n_mix * channels, h, w),
        2 * u(b, n_mix * k, h, w) - 1,
    ], dim=1)


def random_levels(b, c, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (b, c, h, w), generator=g)
    k[0, 0, 0, 0], k[-1, -1, -1, -1] = 0, 255  # make sure both edge bins occur
    return k, k.double() / 127.5 - 1.0


def marginal_params(params, n_mix, channels, keep):
    """The parameters of the model on the first `keep` channels (the marginal, by the layout)."""
    b, _, h, w = params.shape
    m, c, k = n_mix, channels, channels * (channels - 1) // 2
    logits, means, ls, co = params.split([m, m * c, m * c, m * k], dim=1)
    view = lambda t, n, j: t.reshape(b, m, n, h, w)[:, :, :j].reshape(b, m * j, h, w)  # noqa: E731
    return torch.cat([logits, view(means, c, keep), view(ls, c, keep),
                      view(co, k, keep * (keep - 1) // 2)], dim=1)


def reference_dmol_logprob(params, k, n_mix):
    """Plain-Python loops per pixel, straight from the model's definition. k: integer levels."""
    params, k = params.numpy(), k.numpy()
    b_, _, h_, w_ = params.shape
    m_ = n_mix
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    out = np.zeros(b_)
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                p = params[b, :, i, j]
                logits = p[:m_]
                means = p[m_:4 * m_].reshape(m_, 3)
                log_scales = np.maximum(p[4 * m_:7 * m_].reshape(m_, 3), -7.0)
                coeffs = np.tanh(p[7 * m_:10 * m_].reshape(m_, 3))
                kk = k[b, :, i, j]
                x = kk / 127.5 - 1.0
                log_w = logits - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
                terms = []
                for m in range(m_):
                    mu = [means[m, 0],
                          means[m, 1] + coeffs[m, 0] * x[0],
                          means[m, 2] + coeffs[m, 1] * x[0] + coeffs[m, 2] * x[1]]
                    total = log_w[m]
                    for c in range(3):
                        s = math.exp(log_scales[m, c])
                        upper = 1.0 if kk[c] == 255 else sig((x[c] + 1 / 255 - mu[c]) / s)
                        lower = 0.0 if kk[c] == 0 else sig((x[c] - 1 / 255 - mu[c]) / s)
                        mass = upper - lower
                        assert mass > 1e-5, "test params must stay off the tiny-probability branch"
                        total += math.log(mass)
                    terms.append(total)
                terms = np.array(terms)
                out[b] += terms.max() + math.log(np.exp(terms - terms.max()).sum())
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------ Bernoulli


def test_bernoulli_logprob_matches_torch_distribution_including_extreme_logits():
    g = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64)
    logits[0, 0, 0, :4] = torch.tensor([50.0, -50.0, 50.0, -50.0], dtype=torch.float64)
    x = torch.bernoulli(torch.full_like(logits, 0.5), generator=g)
    x[0, 0, 0, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # right, right, wrong, wrong
    want = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    got = bernoulli_logprob(logits, x)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: same value to rounding
    # The extreme entries on their own: confident and right ~ -exp(-50), confident and wrong ~ -50.
    one = lambda l, v: bernoulli_logprob(torch.tensor([[l]]), torch.tensor([[v]])).item()  # noqa: E731
    assert one(50.0, 1.0) == pytest.approx(-math.exp(-50.0), rel=1e-3, abs=1e-30)  # float32, rel 1e-3
    assert one(-50.0, 1.0) == pytest.approx(-50.0, rel=1e-6)  # float32, rel 1e-6
    assert math.isfinite(one(-50.0, 1.0)) and math.isfinite(one(50.0, 0.0))


def test_bernoulli_sample_and_mean():
    logits = torch.tensor([[-50.0, 50.0, 0.0]]).expand(4000, 3)
    s = bernoulli_sample(logits, torch.Generator().manual_seed(0))
    assert s.shape == logits.shape and set(s.unique().tolist()) <= {0.0, 1.0}
    assert s[:, 0].sum() == 0 and s[:, 1].sum() == 4000
    assert abs(s[:, 2].mean().item() - 0.5) < 0.05  # 4000 fair coins: sd 0.008, 6 sd
    torch.testing.assert_close(bernoulli_mean(logits), torch.sigmoid(logits), rtol=0, atol=0)  # exact


# -------------------------------------------------------------------- DMoL: value and reference


def test_dmol_num_params():
    assert dmol_num_params(10) == 100 and dmol_num_params(3, channels=3) == 30
    assert dmol_num_params(5, channels=1) == 15  # logit, mean, log-scale


def test_dmol_logprob_matches_per_pixel_reference():
    n_mix = 3
    params = random_params(n_mix)
    k, x = random_levels(2, 3, 2, 2)
    got = dmol_logprob(params, x, n_mix)
    assert got.shape == (2,) and got.dtype == torch.float64
    want = reference_dmol_logprob(params, k, n_mix)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # float64, 1e-6 nats absolute


def test_dmol_logprob_float32_close_to_float64():
    n_mix = 10
    params = random_params(n_mix, b=2, h=8, w=8, mean_range=1.0, log_scale_range=(-4.0, 0.0))
    _, x = random_levels(2, 3, 8, 8)
    lp64 = dmol_logprob(params, x, n_mix)
    lp32 = dmol_logprob(params.float(), x.float(), n_mix)
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-5, atol=1e-3)  # float32 rounding, ~600 nats


def test_dmol_tiny_probability_branch_is_finite_and_uses_pdf_times_bin_width():
    # One sharp component (log-scale -7, the clamp) far from the data: every bin mass ~exp(-548).
    params = torch.zeros(1, 10, 1, 1, dtype=torch.float64)
    params[:, 1:4] = 0.5  # means; coefficients tanh(0) = 0
    params[:, 4:7] = -7.0
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    got = dmol_logprob(params, x, 1).item()
    z = (0.0 - 0.5) / math.exp(-7.0)
    log_pdf = -abs(z) + 7.0 - 2.0 * math.log1p(math.exp(-abs(z)))  # logistic log-density
    assert math.isfinite(got)
    assert got == pytest.approx(3 * (log_pdf + math.log(2 / 255)), rel=1e-12)  # float64, rel 1e-12
    # Log-scales are clamped at -7: anything lower gives the same value.
    params_low = params.clone()
    params_low[:, 4:7] = -20.0
    assert dmol_logprob(params_low, x, 1).item() == got
    # Float32: still finite, with finite gradients.
    p32 = params.float().requires_grad_()
    lp = dmol_logprob(p32, x.float(), 1)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(p32.grad).all()


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.97, -2.0), (-1.3, 0.5), (0.2, -7.0)])
def test_dmol_single_channel_sums_to_one(mean, log_scale):
    # One channel, two components: probabilities of the 256 levels of one pixel.
    params = torch.tensor([0.3, -0.4, mean, -mean / 2, log_scale, -1.0], dtype=torch.float64)
    params = params.view(1, 6, 1, 1).expand(256, 6, 1, 1)
    p = dmol_logprob(params, LEVELS.view(256, 1, 1, 1), n_mix=2).exp()
    assert abs(p.sum().item() - 1.0) < 1e-5  # 1e-5: the pdf*width fallback for tiny bins is approximate


def test_dmol_coupled_conditionals_are_normalised():
    # RGB, 3 components, nonzero coupling. The 256^3 joint is too big to enumerate, but the
    # marginal of the first j channels is the same mixture on those channels (layout slicing), so
    #   sum_R p(R) = 1,   sum_G p(R, G) = p(R) for all R,   sum_B p(R, G, B) = p(R, G)
    # checks each channel's conditional normalisation given the earlier (coupled) channels.
    n_mix = 3
    params = random_params(n_mix, b=1, h=1, w=1, seed=3, mean_range=1.2, log_scale_range=(-3.0, 0.0))
    params[:, 7 * n_mix:] = 3.0 * torch.rand(1, 3 * n_mix, 1, 1, dtype=torch.float64) - 1.5
    p1, p2 = (marginal_params(params, n_mix, 3, j) for j in (1, 2))
    lp = lambda p, x: dmol_logprob(p.expand(len(x), -1, -1, -1), x[:, :, None, None], n_mix)  # noqa: E731

    pr = lp(p1, LEVELS[:, None]).exp()
    assert abs(pr.sum().item() - 1.0) < 1e-5  # tolerance 1e-5 (fallback branch is approximate)

    r, g = torch.meshgrid(LEVELS, LEVELS, indexing="ij")
    prg = lp(p2, torch.stack([r, g], -1).reshape(-1, 2)).exp().view(256, 256)
    torch.testing.assert_close(prg.sum(1), pr, rtol=1e-5, atol=1e-12)  # rel 1e-5, every R

    for ri, gi in [(0, 0), (255, 255), (0, 255), (128, 7), (40, 200), (250, 128)]:
        x = torch.stack([LEVELS[ri].expand(256), LEVELS[gi].expand(256), LEVELS], -1)
        total = lp(params, x).exp().sum()
        assert total.item() == pytest.approx(prg[ri, gi].item(), rel=1e-5)  # rel 1e-5


# ------------------------------------------------------------------------------- bits per dim


def test_bits_per_dim_uniform_model_is_eight():
    num_dims = 3 * 32 * 32
    nll = -num_dims * math.log(1.0 / 256.0)  # every pixel value has probability 1/256
    assert bits_per_dim(nll, num_dims) == 8.0  # exact in float64
    t = bits_per_dim(torch.tensor([nll, nll], dtype=torch.float64), num_dims)
    assert t.shape == (2,) and (t == 8.0).all()  # exact in float64
    # A fair coin per binary dim is 1 bit/dim.
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.5, dtype=torch.float64))
    bpd = bits_per_dim(-bernoulli_logprob(torch.zeros_like(x), x), 28 * 28)
    torch.testing.assert_close(bpd, torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)  # rounding


# ---------------------------------------------------------------------------------- sampling


def test_dmol_sample_on_grid_in_range_and_reproducible():
    params = random_params(10, b=3, h=8, w=8, dtype=torch.float32, mean_range=1.5,
                           log_scale_range=(-3.0, 1.0))
    s = dmol_sample(params, 10, torch.Generator().manual_seed(0))
    assert s.shape == (3, 3, 8, 8) and s.dtype == torch.float32
    assert s.min() >= -1.0 and s.max() <= 1.0
    k = (s + 1.0) * 127.5
    assert (k - k.round()).abs().max() < 1e-4  # float32 rounding of the level values
    assert (s == -1.0).any() and (s == 1.0).any()  # wide components reach the edge levels
    assert torch.equal(s, dmol_sample(params, 10, torch.Generator().manual_seed(0)))


def test_dmol_sample_dominant_sharp_component_mean():
    n_mix = 3
    raw = torch.tensor([0.5, -0.3, 0.2])
    params = torch.zeros(1, 30, 1, 1)
    params[0, :3, 0, 0] = torch.tensor([20.0, 0.0, 0.0])  # weight 1 - 4e-9 on component 0
    params[0, 3:12, 0, 0] = torch.tensor([0.3, -0.2, 0.1] + [-0.8] * 6)  # means, component-major
    params[0, 12:21, 0, 0] = torch.tensor([-5.0] * 3 + [0.0] * 6)  # sharp: s = 0.0067
    params[0, 21:24, 0, 0] = raw
    c = torch.tanh(raw)
    r = 0.3
    g = -0.2 + c[0] * r
    b = 0.1 + c[1] * r + c[2] * g
    want = torch.tensor([r, g, b])
    params = params.expand(16, 30, 16, 16)
    s = dmol_sample(params, n_mix, torch.Generator().manual_seed(1))
    # 4096 draws: logistic sd 0.012, quantisation to bins of 0.0078 shifts the mean by < 0.004.
    torch.testing.assert_close(s.mean((0, 2, 3)), want, rtol=0, atol=0.01)
    torch.testing.assert_close(dmol_mean(params, n_mix)[0, :, 0, 0], want, rtol=0, atol=1e-6)  # float32


def test_dmol_sample_matches_probabilities():
    # Empirical histograms of R and G of RGB samples vs the exact marginals p(R) and
    # p(G) = sum_R p(R, G) (the latter depends on the sampler's R -> G coupling).
    n_mix, n = 2, 200_000
    params = torch.zeros(1, 20, 1, 1, dtype=torch.float64)  # layout for n_mix = 2, RGB
    params[0, :2, 0, 0] = torch.tensor([0.4, -0.2])  # weights 0.65, 0.35
    params[0, 2:8, 0, 0] = torch.tensor([-0.5, 0.1, 0.0, 0.45, -0.3, 0.2])  # means [m, c]
    params[0, 8:14, 0, 0] = torch.tensor([-3.0, -2.5, -2.0, -2.5, -3.0, -2.0])  # log-scales
    params[0, 14:20, 0, 0] = torch.tensor([0.9, -0.5, 0.3, -0.8, 0.2, 0.6])  # raw coefficients
    s = dmol_sample(params.expand(1, -1, 400, n // 400), n_mix, torch.Generator().manual_seed(2))
    k = ((s[0] + 1.0) * 127.5).round().long().view(3, -1)
    emp_r, emp_g = (torch.bincount(k[c], minlength=256).double() / n for c in (0, 1))

    p1, p2 = (marginal_params(params, n_mix, 3, j) for j in (1, 2))
    exact_r = dmol_logprob(p1.expand(256, -1, -1, -1), LEVELS.view(256, 1, 1, 1), n_mix).exp()
    r, g = torch.meshgrid(LEVELS, LEVELS, indexing="ij")
    x = torch.stack([r, g], -1).reshape(-1, 2, 1, 1)
    exact_g = dmol_logprob(p2.expand(len(x), -1, -1, -1), x, n_mix).exp().view(256, 256).sum(0)
    # Total variation; sampling noise alone gives ~0.007 (R) and ~0.01 (G) at n = 200k.
    assert 0.5 * (emp_r - exact_r).abs().sum().item() < 0.02
    assert 0.5 * (emp_g - exact_g).abs().sum().item() < 0.025


# ----------------------------------------------------------------------------------- gradients


def test_dmol_gradients_flow_and_are_finite():
    n_mix = 4
    params = random_params(n_mix, b=2, h=4, w=4, dtype=torch.float32, mean_range=1.5,
                           log_scale_range=(-9.0, 1.0)).requires_grad_()
    _, x = random_levels(2, 3, 4, 4)
    lp = dmol_logprob(params, x.float(), n_mix)
    (-lp.sum()).backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0


def test_dmol_gradcheck_float64():
    params = random_params(2, b=1, h=2, w=1).requires_grad_()
    _, x = random_levels(1, 3, 2, 1)
    assert torch.autograd.gradcheck(lambda p: dmol_logprob(p, x, 2), (params,))  # default eps/tol


# ------------------------------------------------------------------------------------ dispatch


def test_make_likelihood_dispatch():
    assert set(LIKELIHOODS) == {"bernoulli", "logistic"}
    bern = make_likelihood("bernoulli")
    assert bern.num_params(1) == 1 and bern.num_params(3) == 3
    logits = torch.randn(2, 1, 4, 4)
    x = (logits > 0).float()
    torch.testing.assert_close(bern.logprob(logits, x), bernoulli_logprob(logits, x), rtol=0, atol=0)
    assert bern.sample(logits).shape == x.shape and bern.mean(logits).shape == x.shape

    dmol = make_likelihood("logistic")
    assert dmol.n_mix == 10 and dmol.num_params(3) == 100
    dmol = make_likelihood("logistic", n_mix=5)
    assert dmol.num_params(3) == 50
    params = torch.randn(2, 50, 4, 4)
    _, xi = random_levels(2, 3, 4, 4)
    torch.testing.assert_close(dmol.logprob(params, xi.float()), dmol_logprob(params, xi.float(), 5),
                               rtol=0, atol=0)  # same function
    assert dmol.sample(params).shape == (2, 3, 4, 4)
    m = dmol.mean(params)
    assert m.shape == (2, 3, 4, 4) and m.min() >= -1 and m.max() <= 1


def test_errors_name_the_problem():
    with pytest.raises(HVAEError, match="unknown likelihood"):
        make_likelihood("gaussian")
    with pytest.raises(HVAEError, match="needs dmol_num_params=100"):
        dmol_logprob(torch.randn(1, 90, 2, 2), torch.zeros(1, 3, 2, 2), 10)
    with pytest.raises(HVAEError, match="fit no channel count"):
        dmol_sample(torch.randn(1, 90, 2, 2), 10)
    with pytest.raises(HVAEError, match="differ"):
        bernoulli_logprob(torch.zeros(2, 3), torch.zeros(2, 4))
