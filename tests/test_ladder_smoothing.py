"""OU smoothing of the ladders' generator layers (LVAE, BIVA; issue 22.1).

The float64 reference re-derives the smoothed ELBO of a small MLP ladder from the equations of
models/baselines.py and docs (precision-weighted LVAE posterior; BIVA's BU/TD latents and its
deterministic top-down state h), with explicitly given noise: the posterior draws are fed to the
model through ``normal_like``, the OU seeds through ``OUSmoothing.seed``, and eps_k is the
backend's noise for that seed. It calls the model's nets as functions but none of its forward,
``_head_raw`` or the smoothing helper.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hvae_fast.cli import main
from hvae_fast.config import ModelConfig, OUConfig, RunConfig
from hvae_fast.errors import HVAEError
from hvae_fast.models import baselines
from hvae_fast.models.model import OUSmoothing, build_model
from hvae_fast.models.objectives import elbo_loss, training_loss
from hvae_fast.ops.ou import BACKENDS

TORCH = BACKENDS["torch"]
IMG = (1, 6, 6)
MLP = ModelConfig(arch="mlp", latent_sizes=(4, 3, 2), hidden_sizes=(12, 10, 8))
RESNET = ModelConfig(arch="resnet", num_layers=2, channels=8, blocks=1, data_blocks=1, latent_channels=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def binary(B, shape=IMG, seed=0):
    return torch.bernoulli(torch.full((B, *shape), 0.4), generator=torch.Generator().manual_seed(seed))


def gauss(out, min_scale):
    mu, raw = out.chunk(2, dim=1)
    return mu, F.softplus(raw) + min_scale


def log_normal(x, mu, sigma):
    return (-0.5 * math.log(2 * math.pi) - sigma.log() - 0.5 * ((x - mu) / sigma) ** 2).flatten(1).sum(1)


def averaged_head(outs, z, target, min_scale):
    """log N(z | mu_bar, sigma_bar) from the K heads ``outs`` [K x [B, 2D]] (ou.py's two modes)."""
    mus, sigmas = zip(*(gauss(o, min_scale) for o in outs))
    mu_k, s_k = torch.stack(mus), torch.stack(sigmas)
    s_bar = s_k.mean(0)
    mu_bar = mu_k.mean(0) if target == "mean-std" else s_bar * (mu_k / s_k).mean(0)
    return log_normal(z, mu_bar, s_bar)


def ou_inputs(z, mu, sigma, rho, K, seed):
    """The K correlated samples z'_k = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps_k, eps from ``seed``."""
    eps = TORCH.correlated_noise(seed, K, z.shape, dtype=torch.float64)
    return [rho * z + (1 - rho) * mu + sigma * math.sqrt(1 - rho * rho) * eps[k] for k in range(K)]


def reference_lvae(m, x, eps_q, rho, K, seeds, target):
    """The MLP Ladder VAE's smoothed ELBO [B]. eps_q: the posterior noise of layers L-1..0 (top-down);
    seeds[j]: the OU seed of the j-th smoothed layer, top-down (layer L-2 first)."""
    ms, L = m.cfg.min_scale, m.depth
    h, hat = x, []
    for i in range(L):  # bottom-up: d_i and (mu_hat_i, sigma_hat_i)
        out, h = m.enc[i](h)
        hat.append(gauss(out, ms))
    mu, sigma = hat[-1]
    eps_q = list(eps_q)
    z = mu + sigma * eps_q.pop(0)
    elbo = -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) - log_normal(z, mu, sigma)
    for j, i in enumerate(reversed(range(L - 1))):
        mu_p, sigma_p = gauss(m.gen[i](z)[0], ms)
        (mu_h, sigma_h), prec_h, prec_p = hat[i], hat[i][1] ** -2, sigma_p ** -2
        var_q = 1 / (prec_h + prec_p)
        mu_q, sigma_q = (mu_h * prec_h + mu_p * prec_p) * var_q, var_q.sqrt()
        z_i = mu_q + sigma_q * eps_q.pop(0)
        heads = [m.gen[i](zk)[0] for zk in ou_inputs(z, mu, sigma, rho, K, seeds[j])]
        elbo = elbo + averaged_head(heads, z_i, target, ms) - log_normal(z_i, mu_q, sigma_q)
        z, mu, sigma = z_i, mu_q, sigma_q
    logits = m.px(z)[0]
    return elbo - F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def reference_biva(m, x, eps_q, rho, K, seeds, target):
    """The MLP BIVA's smoothed ELBO [B]. eps_q: the BU noise of layers 0..L-1 (the top's last), then
    the TD noise of layers L-2..0; seeds as in reference_lvae. Layer i < L-1 holds z_i = [z_i^BU, z_i^TD];
    generator layer i reads [z_{i+1}, h_{i+1}] (the top's: z_L) and returns both heads and h_i."""
    ms, L = m.cfg.min_scale, m.depth
    eps_q = list(eps_q)
    d, bu = [], []
    for i in range(L):  # the stochastic bottom-up path
        out, h = m.bu[i](x if i == 0 else torch.cat([d[-1], bu[-1][0]], 1))
        mu, sigma = gauss(out, ms)
        bu.append((mu + sigma * eps_q.pop(0), mu, sigma))
        d.append(h)
    z, mu, sigma = bu[-1]
    elbo = -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) - log_normal(z, mu, sigma)
    h = None
    for j, i in enumerate(reversed(range(L - 1))):
        reads = [] if h is None else [h]  # h_{i+1}: the top-down state of the real samples, not smoothed
        _, h_i = m.gen[i](torch.cat([z, *reads], 1))
        mu_t, sigma_t = gauss(m.td[i](torch.cat([h_i, d[i]], 1))[0], ms)
        z_td = mu_t + sigma_t * eps_q.pop(0)
        z_bu, mu_b, sigma_b = bu[i]
        z_i = torch.cat([z_bu, z_td], 1)
        heads = []
        for zk in ou_inputs(z, mu, sigma, rho, K, seeds[j]):
            out = m.gen[i](torch.cat([zk, *reads], 1))[0]
            (mb, sb), (mt, st) = out[:, :2 * z_bu.shape[1]].chunk(2, 1), out[:, 2 * z_bu.shape[1]:].chunk(2, 1)
            heads.append(torch.cat([mb, mt, sb, st], 1))
        elbo = elbo + averaged_head(heads, z_i, target, ms) - log_normal(z_bu, mu_b, sigma_b) - log_normal(z_td, mu_t, sigma_t)
        z, mu, sigma, h = z_i, torch.cat([mu_b, mu_t], 1), torch.cat([sigma_b, sigma_t], 1), h_i
    logits = m.px(torch.cat([z, h], 1))[0]
    return elbo - F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def posterior_noise(method, B, g):
    """The posterior draws in the order the model makes them (LVAE: top-down; BIVA: BU bottom-up, then TD top-down)."""
    sizes = list(MLP.latent_sizes)
    order = sizes[::-1] if method == "lvae" else sizes + sizes[-2::-1]
    return [torch.randn(B, d, generator=g, dtype=torch.float64) for d in order]


@pytest.mark.parametrize("target", ["mean-std", "ratio"])
@pytest.mark.parametrize("method", ["lvae", "biva"])
def test_smoothed_ladder_elbo_and_gradients_match_a_float64_reference(method, target, monkeypatch):
    torch.manual_seed(0)
    m = build_model(method, MLP, IMG).double()
    B, K, rho, seeds = 5, 3, 0.6, [101, 202]
    x = binary(B).double()
    eps = posterior_noise(method, B, torch.Generator().manual_seed(1))
    fed = list(eps)

    def given_noise(mu):
        e = fed.pop(0)
        assert e.shape == mu.shape, "the model draws its posterior noise in another order than the reference"
        return e

    given_seeds = list(seeds)
    monkeypatch.setattr(baselines, "normal_like", given_noise)
    monkeypatch.setattr(OUSmoothing, "seed", lambda self: given_seeds.pop(0))
    terms = m(x, OUSmoothing(rho, K, TORCH, target))
    assert not fed and not given_seeds
    got = terms.log_weight
    ref = (reference_lvae if method == "lvae" else reference_biva)(m, x, eps, rho, K, seeds, target)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    params = list(m.parameters())
    g_got = torch.autograd.grad(got.mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.mean(), params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # The smoothing changes the objective at this rho (the reference is not the plain ELBO).
    fed[:] = eps
    plain = m(x).log_weight
    assert (plain - got).abs().max() > 1e-3


ARCHS = {"mlp": MLP, "resnet": RESNET}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lvae", "biva"])
def test_rho_one_is_the_plain_objective_and_evaluation_is_unsmoothed(method, arch):
    # rho = 1 makes every z'_k equal z_{i+1} (ResNets: with the top-down state repeated per k in the
    # order of the samples), so ELBO and gradients are the plain ones up to the K-average's float32
    # rounding; the OU seeds are drawn after the posterior's, so both forwards share their samples.
    # rho < 1 changes only the intermediate log p terms; ou=None (evaluation) is the plain forward.
    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "resnet" else IMG
    m, x = build_model(method, ARCHS[arch], shape), binary(4, shape)
    out = {}
    for name, ou in [("plain", None), ("rho1", OUSmoothing(1.0, 3, TORCH)), ("rho.5", OUSmoothing(0.5, 3, TORCH)),
                     ("again", None)]:
        torch.manual_seed(3)
        t = m(x, ou)
        out[name] = (t, torch.autograd.grad(elbo_loss(t)[0], list(m.parameters())))
    (plain, g_plain), (same, g_same), (smooth, _), (again, _) = (out[k] for k in ("plain", "rho1", "rho.5", "again"))
    torch.testing.assert_close(same.log_weight, plain.log_weight, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_plain, g_same):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(smooth.log_px, plain.log_px) and torch.equal(smooth.log_p[-1], plain.log_p[-1])
    assert all(torch.equal(a, b) for a, b in zip(smooth.log_q, plain.log_q))
    assert not torch.allclose(smooth.log_p[0], plain.log_p[0], atol=1e-3)
    assert torch.equal(again.log_weight, plain.log_weight)


@pytest.mark.parametrize("method", ["lvae", "biva"])
def test_recompute_gives_the_same_ladder_gradients(method):
    # --ou-recompute rebuilds the K*B pass of stage i+1 (reading the repeated block outputs of
    # stage i+2) in backward: same loss and gradients up to float32 reassociation.
    torch.manual_seed(0)
    m, x = build_model(method, RESNET, (1, 8, 8)), binary(4, (1, 8, 8))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(9)
        loss, _ = training_loss(m, x, method, OUSmoothing(0.8, 3, TORCH, recompute=recompute), 1.0, 0.0, 1)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_ladder_config_refuses_inference_smoothing():
    with pytest.raises(HVAEError, match="--ou-inference smooths the stacked VAE's inference network"):
        RunConfig(method="lvae", ou=OUConfig(smooth_inference=True)).validate()
    RunConfig(method="biva", ou=OUConfig(rho=0.7, rho_control=3.0)).validate()


@pytest.mark.parametrize("method, arch", [("lvae", "mlp"), ("biva", "resnet"), pytest.param("biva", "mlp", marks=pytest.mark.slow),
                                          pytest.param("lvae", "resnet", marks=pytest.mark.slow)])
def test_ladders_train_smoothed_from_the_cli(method, arch, shared_data, tmp_path):
    model = (["--latent-sizes", "4,2", "--hidden-sizes", "16,8"] if arch == "mlp" else
             ["--arch", "resnet", "--num-layers", "2", "--channels", "4", "--blocks", "1", "--data-blocks", "1",
              "--latent-channels", "2"])
    out = tmp_path / "run"
    code = main(["train", "binarized-mnist", "--method", method, "--rho", "0.8", "--ou-samples", "2", "--steps", "3",
                 "--batch-size", "8", "--eval-every", "3", "--eval-examples", "16", "--log-every", "1",
                 "--backend", "torch", "--device", "cpu", "--data-dir", str(shared_data), "--out", str(out),
                 "--no-progress", *model])
    assert code == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rho"] for r in recs if r["split"] == "train"] == [0.8] * 3
