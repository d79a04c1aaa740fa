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

RHOS = [r / 10 for r in range(11)]
# Normalised probabilists' Hermite polynomials: E[h_j h_k] = [j == k] under N(0, 1).
H = {0: lambda e: torch.ones_like(e), 1: lambda e: e, 2: lambda e: (e * e - 1) / math.sqrt(2),
     3: lambda e: (e**3 - 3 * e) / math.sqrt(6)}


def test_fit_recovers_an_exact_spectrum():
    W = np.array([0.7, 0.2, 0.0, 0.05, 0.0, 0.05])
    S = np.power.outer(np.array(RHOS), np.arange(6)) @ W
    fit = dg.fit_spectrum(RHOS, S, 5)
    np.testing.assert_allclose(fit["W"], W, atol=1e-8)
    assert fit["frac_above_degree_1"] == pytest.approx(0.1 / 0.3)
    assert 1e2 < fit["condition_number"] < 1e5


# (units' functions of the standard coordinates e [n, 2], exact W_0..W_3 per unit)
CASES = {
    "h1": (lambda e: H[1](e[:, :1]), [0, 1, 0, 0]),
    "h2": (lambda e: H[2](e[:, :1]), [0, 0, 1, 0]),
    "h3": (lambda e: H[3](e[:, 1:]), [0, 0, 0, 1]),
    # one unit: 0.5 + 0.6 h1(e1) + 0.5 h2(e1) + 0.4 h3(e2); energies are squared coefficients
    "mixture": (lambda e: 0.5 + 0.6 * H[1](e[:, :1]) + 0.5 * H[2](e[:, :1]) + 0.4 * H[3](e[:, 1:]), [0.25, 0.36, 0.25, 0.16]),
    # two units, h2 and h3 of different coordinates: each carries half the per-unit energy
    "two units": (lambda e: torch.cat([H[2](e[:, :1]), H[3](e[:, 1:])], 1), [0, 0, 0.5, 0.5]),
}


@pytest.mark.parametrize("name", CASES)
def test_spectrum_of_hermite_polynomials(name, one_thread):
    g, W = CASES[name]
    gen = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(20, 2, generator=gen, dtype=torch.float64), 0.3 + torch.rand(20, 2, generator=gen, dtype=torch.float64)
    # f sees z = mu + sigma e ([noise * 20, 2], noise-major), as a generator layer does; it recovers e
    # with the posterior it was given
    f = lambda z: g(((z.view(-1, 20, 2) - mu) / sigma).reshape(-1, 2))  # noqa: E731
    S, se = dg.noise_stability(f, mu, sigma, RHOS, 20000, gen)
    exact = np.power.outer(np.array(RHOS), np.arange(4)) @ np.array(W, float)
    # the estimate of S(rho) itself, within 4 standard errors (+ float rounding at rho = 0 for constants)
    assert np.all(np.abs(S - exact) <= 4 * se + 1e-9), (S, exact, se)
    fit = dg.fit_spectrum(RHOS, S, 5)
    # Tolerance: S's standard errors are ~ 0.005 here and the fit amplifies them (condition number
    # ~ 3e3, though common random numbers keep the error smooth in rho); over seeds 0..2 the largest
    # error was 0.033, so 0.08 absolute leaves a margin of 2.5.
    np.testing.assert_allclose(fit["W"], W + [0, 0], atol=0.08)


def test_a_linear_layer_has_all_its_variance_at_degree_1(one_thread):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    mu, sigma = torch.randn(30, 3, dtype=torch.float64), 0.2 + torch.rand(30, 3, dtype=torch.float64)
    with torch.no_grad():
        S, _ = dg.noise_stability(lin, mu, sigma, RHOS, 500, torch.Generator().manual_seed(1))
        fit = dg.fit_spectrum(RHOS, S, 5)
        W0 = (lin(mu) ** 2).sum(1).mean().item() / 4
        W1 = ((lin.weight[None] * sigma[:, None, :]) ** 2).sum((1, 2)).mean().item() / 4
    assert fit["W"][0] == pytest.approx(W0, rel=0.02)
    assert fit["W"][1] == pytest.approx(W1, rel=0.05)
    assert fit["frac_above_degree_1"] < 0.02


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
        assert len(lay["stability"]) == 11
    assert png.stat().st_size > 0


@pytest.mark.parametrize("args,needle", [
    (["--rhos", "0,0.5,1.2"], "rho must lie in [0, 1]"),
    (["--degree", "12"], "cannot determine 13 Hermite energies"),
    (["--noise", "1"], "--noise >= 2"),
])
def test_spectrum_bad_input_is_one_line(tiny_run, args, needle, capsys):
    assert main(["spectrum", str(tiny_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
