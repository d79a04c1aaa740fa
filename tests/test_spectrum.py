"""`hvae-fast spectrum`: the noise-stability estimate and the NNLS fit against functions with known
Hermite spectra, and the command on a tiny trained run."""

import json
import math

import numpy as np
import pytest
import torch

from hvae_fast.experiments import diagnostics as dg
from hvae_fast.cli import main
from test_gradvar import train_tiny_run


def h(d, e):
    """The normalised probabilists' Hermite polynomial h_d(e): E[h_j h_k] = [j == k] under N(0, 1)."""
    prev, cur = torch.ones_like(e), e
    if d == 0:
        return prev
    for k in range(1, d):
        prev, cur = cur, e * cur - k * prev
    return cur / math.sqrt(math.factorial(d))


def test_fit_recovers_an_exact_spectrum():
    rhos = dg.circle_rhos(12)
    np.testing.assert_allclose(rhos, [1, 3**0.5 / 2, 0.5, 0, -0.5, -(3**0.5) / 2, -1], atol=1e-12)
    W = np.array([0.2, 0.0, 0.05, 0.0, 0.05])
    fit = dg.fit_spectrum(rhos, np.power.outer(rhos, np.arange(1, 6)) @ W, 5, W0=0.7)
    np.testing.assert_allclose(fit["W"], [0.7, *W], atol=1e-10)
    assert fit["frac_above_degree_1"] == pytest.approx(0.1 / 0.3)
    # the [-1, 1] grid is well conditioned (the former [0, 1] grid of 11 rhos: ~3e3)
    assert fit["condition_number"] < 50 and fit["W_stderr"] is None


# (units' functions of the standard coordinates e [n, 2], exact W_0..W_5 per unit)
CASES = {f"h{d}": (lambda e, d=d: h(d, e[:, :1]), np.eye(6)[d]) for d in range(1, 6)}
CASES.update({
    # one unit: 0.5 + 0.6 h1(e1) + 0.5 h2(e1) + 0.4 h3(e2); energies are squared coefficients
    "mixture": (lambda e: 0.5 + 0.6 * h(1, e[:, :1]) + 0.5 * h(2, e[:, :1]) + 0.4 * h(3, e[:, 1:]),
                [0.25, 0.36, 0.25, 0.16, 0, 0]),
    # two units, h2 and h5 of different coordinates: each carries half the per-unit energy
    "two units": (lambda e: torch.cat([h(2, e[:, :1]), h(5, e[:, 1:])], 1), [0, 0, 0.5, 0, 0, 0.5]),
    # a large mean (as a generator layer's output has) does not swamp the variance: it is W_0 alone
    "offset h4": (lambda e: 3.0 + h(4, e[:, :1]), [9, 0, 0, 0, 1, 0]),
})


def spectrum_of(name, points, noise, seed=0):
    """The fitted W_0..W_5 of CASES[name], its standard errors and the exact W, evaluated with the
    posterior mu = 0, sigma = 1 (so z = e)."""
    g, W = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    zero = torch.zeros(points, 2, dtype=torch.float64)
    st = dg.noise_stability(g, zero, zero + 1, noise, dg.SPECTRUM_ANGLES, gen)
    fit = dg.fit_spectrum(st["rhos"], st["S"], 5, st["cov"], st["W0"], st["W0_stderr"])
    return np.array(fit["W"]), np.array(fit["W_stderr"]), np.array(W, float)


@pytest.mark.parametrize("name", CASES)
def test_error_bars_cover_the_error_on_few_draws(name, one_thread):
    # 200 points x 100 draws (1% of the defaults): the error is larger, the standard errors say so
    for seed in (0, 1):
        W, se, exact = spectrum_of(name, 200, 100, seed)
        assert np.all(np.abs(W - exact) <= 4 * se + 0.01), (W, se, exact)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_known_spectra_within_0_05_at_the_defaults(name, one_thread):
    W, se, exact = spectrum_of(name, dg.SPECTRUM_POINTS, dg.SPECTRUM_NOISE)
    assert np.abs(W - exact).max() <= 0.05 * max(1.0, exact.sum()), (W, exact)
    assert np.all(se[exact[1:].nonzero()[0] + 1] < 0.025), se  # and it knows it: 2 standard errors < 0.05


def test_a_linear_layer_has_all_its_variance_at_degree_1(one_thread):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    mu, sigma = torch.randn(30, 3, dtype=torch.float64), 0.2 + torch.rand(30, 3, dtype=torch.float64)
    with torch.no_grad():
        st = dg.noise_stability(lin, mu, sigma, 200, 12, torch.Generator().manual_seed(1))
        fit = dg.fit_spectrum(st["rhos"], st["S"], 5, st["cov"], st["W0"], st["W0_stderr"])
        W0 = (lin(mu) ** 2).sum(1).mean().item() / 4
        W1 = ((lin.weight[None] * sigma[:, None, :]) ** 2).sum((1, 2)).mean().item() / 4
    # a linear map's mean over each circle is exact, and its products on a circle are exact cosines
    assert fit["W"][0] == pytest.approx(W0, rel=1e-9)
    assert fit["W"][1] == pytest.approx(W1, rel=0.05)
    assert fit["frac_above_degree_1"] < 1e-9


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


def test_spectrum_cli_on_a_trained_run(tiny_run, tmp_path, one_thread):
    js, png = tmp_path / "sp.json", tmp_path / "sp.png"
    assert main(["spectrum", str(tiny_run), "--points", "16", "--noise", "8", "--degree", "4", "--json", str(js),
                 "--plot", str(png), "--no-progress"]) == 0
    res = json.loads(js.read_text())
    assert res["degree"] == 4 and res["condition_number"] > 1
    (ck,) = res["checkpoints"]
    assert [lay["layer"] for lay in ck["layers"]] == ["p(z_1|z_2)", "p(z_2|z_3)", "p(z_3|z_4)"]
    for lay in ck["layers"]:
        assert len(lay["W"]) == 5 and min(lay["W"]) >= 0 and 0 <= lay["frac_above_degree_1"] <= 1
        assert len(lay["stability"]) == len(lay["rhos"]) == 7 and len(lay["W_stderr"]) == 5
    assert png.stat().st_size > 0


@pytest.mark.parametrize("args,needle", [
    (["--angles", "1"], "--angles >= 2"),
    (["--degree", "12"], "7 rho values cannot determine 13 Hermite energies: pass --angles >= 24"),
    (["--noise", "1"], "--noise >= 2"),
])
def test_spectrum_bad_input_is_one_line(tiny_run, args, needle, capsys):
    assert main(["spectrum", str(tiny_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
