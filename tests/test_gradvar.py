"""`hvae-fast gradvar`: the variance/bias statistics against closed forms, rho = 1 against the plain
VAE estimator, and the command on a tiny trained run."""

import json
import math

import numpy as np
import pytest
import torch

from hvae_fast.experiments import diagnostics as dg
from hvae_fast.cli import main
from hvae_fast.config import ModelConfig
from hvae_fast.models.model import HierarchicalVAE
from hvae_fast.ops.ou import get_backend


class LinearGaussian(torch.nn.Module):
    """One generator layer with a linear mean, p(z_1 | z_2) = N(a z_2 + b, 1), smoothed around a
    posterior q(z_2) = N(m, s^2). Each row of x is one example (z_1, m, s); loss = batch mean of
    0.5 (z_1 - a zbar - b)^2 with zbar the mean of the K OU samples, drawn by the torch backend."""

    def __init__(self, a=1.3, b=-0.4):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(b))
        self.backend = get_backend("torch", "cpu")

    def loss(self, x, rho, K):
        z1, m, s = x.unbind(1)
        z = m + s * torch.randn_like(m)
        if rho is not None:
            seed = int(torch.randint(0, 2**62, (1,)))
            z = self.backend.correlated_samples(z, m, s, rho, K, seed).mean(0)
        return (0.5 * (z1 - self.a * z - self.b) ** 2).mean()

    def closed_form(self, x, rho, K):
        """(trace variance of [grad b, grad a], mean of grad a) of the batch-mean loss.

        zbar = m + s u, u ~ N(0, tau2), tau2 = rho^2 + (1 - rho^2) / K; with r = z1 - a m - b, c = a s:
        grad b = -(r - c u), grad a = -(r - c u)(m + s u); Var(u^2) = 2 tau2^2.
        """
        z1, m, s = (v.double() for v in x.unbind(1))
        a, b = self.a.item(), self.b.item()
        tau2 = 1.0 if rho is None else rho**2 + (1 - rho**2) / K
        r, c = z1 - a * m - b, a * s
        var_b = c**2 * tau2
        var_a = (r * s - c * m) ** 2 * tau2 + 2 * c**2 * s**2 * tau2**2
        B = x.shape[0]
        return float((var_a + var_b).sum() / B**2), float((-(r * m - c * s * tau2)).mean())


def test_variance_and_bias_match_the_linear_gaussian_closed_form(one_thread):
    torch.manual_seed(0)
    x = torch.stack([torch.randn(3), torch.randn(3), 0.5 + torch.rand(3)], 1)
    model = LinearGaussian()
    rhos, Ks, D = [0.3, 1.0], [4], 600
    res = dg.gradvar(model.loss, [[model.b], [model.a]], ["b", "a"], [x], rhos, Ks, D, seed=1)
    _, mean_ref = model.closed_form(x, None, None)
    for p in res["points"]:
        var, mean_a = model.closed_form(x, p["rho"], p["K"])
        # Monte Carlo tolerance: 4 jackknife standard errors, which are themselves ~ sqrt(2 / D) relative.
        assert abs(p["variance_total"] - var) < 4 * p["variance_stderr"], (p, var)
        assert p["variance_stderr"] < 0.2 * var
        bias = abs(mean_a - mean_ref)  # grad b's mean does not depend on rho
        assert abs(p["bias_sq_total"] - bias**2) < 4 * p["bias_sq_stderr"] + 1e-12, (p, bias)
        assert p["per_layer"][0]["bias_sq"] == pytest.approx(0.0, abs=4 * p["per_layer"][0]["bias_sq_stderr"] + 1e-12)
        # the totals are the layers' sums: traces add over disjoint parameter groups
        assert p["variance_total"] == pytest.approx(sum(lay["variance"] for lay in p["per_layer"]), rel=1e-9)
    # smoothing with rho = 0.3 and K = 4 must lower the variance and create a clear bias
    low = next(p for p in res["points"] if p["rho"] == 0.3 and p["K"] == 4)
    plain = next(p for p in res["points"] if p["rho"] == 1.0 and p["K"] == 4)
    assert low["variance_total"] < 0.5 * plain["variance_total"]
    assert low["bias_total"] > 5 * low["bias_stderr"]


def test_gram_statistics_match_direct_numpy():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.3
    s = dg.variance_and_bias([(c @ c.T, c @ r.T, r @ r.T)])
    var_c = np.var(c, axis=0, ddof=1).sum()
    assert s["variance"] == pytest.approx(var_c)
    d2 = ((c.mean(0) - r.mean(0)) ** 2).sum() - var_c / 7 - np.var(r, axis=0, ddof=1).sum() / 7
    assert s["bias_sq"] == pytest.approx(d2)
    loo = [np.var(np.delete(c, d, 0), axis=0, ddof=1).sum() for d in range(7)]
    assert s["variance_stderr"] == pytest.approx(math.sqrt(6 / 7 * ((np.array(loo) - np.mean(loo)) ** 2).sum()))


def test_rho_one_reproduces_the_plain_vae_estimator(one_thread):
    cfg = ModelConfig(latent_sizes=[3, 2, 2], hidden_sizes=[8, 8, 8], likelihood="bernoulli")
    torch.manual_seed(0)
    model = HierarchicalVAE(cfg, (1, 4, 4))
    x = (torch.rand(6, 1, 4, 4) < 0.5).float()
    groups = [list(g.parameters()) for g in model.gen]
    D = 8
    res = dg.gradvar(dg.model_loss_fn(model, get_backend("torch", "cpu")), groups, dg._layer_names(model), [x],
                     [1.0], [3], D, seed=5)
    # Directly: the VAE loss's gradients with the seeds gradvar used for this estimator, and numpy's variance.
    from hvae_fast.models.objectives import elbo_loss

    per_layer = [[] for _ in groups]
    for d in range(D):
        torch.manual_seed(dg.draw_seed(5, "rho=1.0,K=3", 0, d))
        loss, _ = elbo_loss(model(x))
        model.zero_grad()
        loss.backward()
        for i, g in enumerate(groups):
            per_layer[i].append(torch.cat([p.grad.reshape(-1) for p in g]).double().numpy())
    p = res["points"][0]
    for i, rows in enumerate(per_layer):
        direct = np.var(np.array(rows), axis=0, ddof=1).sum()
        assert p["per_layer"][i]["variance"] == pytest.approx(direct, rel=1e-4)
    # and the reference estimator (independent draws) agrees within Monte Carlo error
    ref = res["reference"]
    assert abs(p["variance_total"] - ref["variance_total"]) < 4 * math.hypot(p["variance_stderr"], ref["variance_stderr"])
    assert p["bias_sq_total"] == pytest.approx(0.0, abs=4 * p["bias_sq_stderr"])


def train_tiny_run(tmp_path_factory):
    """A 5-step mnist-mlp-40x4 run, trained once per session (test_spectrum.py reuses it)."""
    import subprocess
    import sys

    from conftest import SHARED_DATA

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}: set HVAE_DATA_DIR")
    out = tmp_path_factory.getbasetemp() / "diagnostics-tiny-run"
    if not (out / "checkpoint-latest.pt").exists():
        p = subprocess.run([sys.executable, "-m", "hvae_fast", "train", "binarized-mnist", "--preset", "mnist-mlp-40x4",
                            "--steps", "5", "--batch-size", "16", "--eval-examples", "32", "--checkpoint-every", "5",
                            "--backend", "torch", "--device", "cpu", "--data-dir", str(SHARED_DATA), "--out", str(out),
                            "--no-progress"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory)


def test_gradvar_cli_on_a_trained_run(tiny_run, tmp_path, one_thread):
    js, png = tmp_path / "gv.json", tmp_path / "gv.png"
    assert main(["gradvar", str(tiny_run), "--rho", "0.5,1", "--K", "1,2", "--batches", "1", "--batch-size", "4",
                 "--draws", "4", "--json", str(js), "--plot", str(png), "--no-progress",
                 "--checkpoints", str(tiny_run), "--every", "5"]) == 0
    res = json.loads(js.read_text())
    assert [(p["rho"], p["K"]) for p in res["points"]] == [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    for p in res["points"]:
        assert p["step"] == 5 and len(p["per_layer"]) == 3 and p["variance_total"] > 0
        for k in ("variance_stderr", "bias_total", "bias_stderr"):
            assert math.isfinite(p[k])
    assert png.stat().st_size > 0


@pytest.mark.parametrize("args,needle", [
    (["--rho", "1.5"], "rho must lie in [0, 1]"),
    (["--rho", "a,b"], "--rho expects a comma-separated list"),
    (["--K", "0"], "K must be >= 1"),
    (["--draws", "3"], "--draws >= 4"),
    (["--checkpoints", "/nonexistent.pt"], "does not exist"),
])
def test_gradvar_bad_input_is_one_line(tiny_run, args, needle, capsys):
    assert main(["gradvar", str(tiny_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_gradvar_missing_run_is_one_line(tmp_path, capsys):
    assert main(["gradvar", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_checkpoint_files_keeps_every_nth_step_once(tmp_path):
    for step in (100, 200, 300, 400):
        torch.save({"step": step, "model": {}}, tmp_path / f"step{step}.pt")
    torch.save({"step": 400, "model": {}}, tmp_path / "checkpoint-latest.pt")  # same step as step400.pt
    got = dg.checkpoint_files(tmp_path, [tmp_path], 200)
    assert [s for s, _ in got] == [200, 400]
    assert [s for s, _ in dg.checkpoint_files(tmp_path, [tmp_path / "step300.pt", tmp_path], 0)] == [100, 200, 300, 400]
    with pytest.raises(dg.HVAEError, match="lower --every"):
        dg.checkpoint_files(tmp_path, None, 7)
