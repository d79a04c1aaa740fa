"""Baselines (LVAE, BIVA) and every training method on tiny models, on CPU.

Tiny models: 1x8x8 binary images; MLP latents (4, 3) with 16 hidden units; ResNet 8 maps, 1 block,
2-channel latents at 4x4. Whole file: a few seconds on 2 cores.
"""

import dataclasses
import math

import pytest
import torch

from hvae_fast.baselines import BIVA, LadderVAE, precision_weighted
from hvae_fast.config import PRESETS, ModelConfig, preset_config
from hvae_fast.errors import HVAEError
from hvae_fast.evaluate import evaluate
from hvae_fast.distributions import gaussian_logprob, split_gaussian
from hvae_fast.model import OUSmoothing, build_model, count_parameters
from hvae_fast.objectives import elbo, iw_bound, iw_log_weights, iwae_loss, log_mean_exp, training_loss
from hvae_fast.ou import BACKENDS

IMG = (1, 8, 8)
ARCHS = {
    "mlp": ModelConfig(arch="mlp", latent_sizes=(4, 3), hidden_sizes=(16, 16)),
    "resnet": ModelConfig(arch="resnet", num_layers=2, channels=8, blocks=1, data_blocks=1, latent_channels=2,
                          latent_stride=1),
}
METHODS = ("vae", "hvae", "iwae", "lvae", "biva")


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *IMG), generator=g) < 0.3).float()


def tiny(method, arch, seed=0):
    torch.manual_seed(seed)
    return build_model(method, ARCHS[arch], IMG)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_training_steps_reduce_loss(method, arch):
    model = tiny(method, arch)
    x = data()
    ou = OUSmoothing(rho=0.9, samples=3, backend=BACKENDS["torch"]) if method == "hvae" else None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, bound = training_loss(model, x, method, ou, beta=1.0, free_bits=0.0, iw_k=3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and torch.isfinite(bound).all()
        losses.append(loss.item())
    # Fitting one fixed batch: the loss (~45 nats at init) falls by far more than its noise.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def ancestral_sample(model, n, seed, method):
    """Ancestral sampling written out from each model's generative equations (module docstrings),
    with the same draws in the same order as the shared StackedVAE.sample: [n, C, H, W] means."""
    g, ms = torch.Generator().manual_seed(seed), model.cfg.min_scale
    z, h, above = torch.randn((n, *model.latent_shapes[-1]), generator=g), None, []
    for i in reversed(range(model.depth - 1)):
        if method == "biva":  # g_i([z_{i+1}, h_{i+1}]) -> p(z_i^BU), p(z_i^TD); z_i = [z^BU, z^TD]
            out, h = model.gen[i](z if h is None else torch.cat([z, h], 1))
            mu_b, raw_b, mu_t, raw_t = out.chunk(4, dim=1)
            mu, raw = torch.cat([mu_b, mu_t], 1), torch.cat([raw_b, raw_t], 1)
        else:  # p(z_i | z_{i+1}) from gen_i; HVAE+'s gen_i also reads the latents above z_{i+1}
            out = model.gen[i](torch.cat([z, *above], 1))[0]
            mu, raw = out.chunk(2, dim=1)
            above = [z, *above] if model.cfg.skip else []
        sigma = torch.nn.functional.softplus(raw) + ms
        z = mu + sigma * torch.randn(mu.shape, generator=g)
    if method == "biva":
        params = model.px(z if h is None else torch.cat([z, h], 1))[0]
    else:
        params = model.px(torch.cat([z, *above], 1))[0]
    return model.likelihood.mean(params)


@pytest.mark.parametrize("method, arch", [(m, a) for m in ("hvae", "lvae", "biva") for a in ARCHS] +
                         [("hvae", "resnet-skip")])
def test_shared_sample_follows_each_models_generative_path(method, arch):
    cfg = dataclasses.replace(ARCHS["resnet"], num_layers=3, skip=True) if arch == "resnet-skip" else ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(method, cfg, IMG)
    got = model.sample(4, generator=torch.Generator().manual_seed(7))
    # Equal up to float rounding (a softplus on a strided view may round its last bit differently).
    torch.testing.assert_close(got, ancestral_sample(model, 4, 7, method), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, model.sample(4, generator=torch.Generator().manual_seed(8)), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ("lvae", "biva"))
def test_baseline_terms_shapes_and_sampling(method, arch):
    model = tiny(method, arch)
    B = 5
    t = model(data(B))
    assert model.depth == 2 and t.log_px.shape == (B,)
    assert len(t.log_q) == len(t.log_p) == len(t.q_mean) == 2
    for lq, lp, m, s in zip(t.log_q, t.log_p, t.q_mean, model.latent_shapes):
        assert lq.shape == lp.shape == (B,) and m.shape == (B, *s)
    # BIVA: the layer below the top holds (BU, TD), twice the channels of the top.
    z0 = ARCHS[arch].latent_sizes[0] if arch == "mlp" else ARCHS[arch].latent_channels
    assert model.latent_shapes[0][0] == (2 * z0 if method == "biva" else z0)
    g = torch.Generator().manual_seed(0)
    assert model.sample(3, generator=g).shape == (3, *IMG)
    assert model.sample(3, generator=g, mean=False).shape == (3, *IMG)
    with pytest.raises(HVAEError):
        model(data(B), OUSmoothing(0.9, 2, BACKENDS["torch"]))


@pytest.mark.parametrize("method", METHODS)
def test_iwae_k1_equals_elbo_of_same_sample(method):
    """k = 1: repeat_batch is the identity and the same RNG draws give the same sample, so the
    IWAE bound and the ELBO agree to float32 rounding (tolerance 1e-4 nats)."""
    model = tiny(method, "mlp")
    x = data(6)
    torch.manual_seed(123)
    _, bound = iwae_loss(model, x, 1)
    torch.manual_seed(123)
    ref = elbo(model(x))
    torch.testing.assert_close(bound, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ("vae", "lvae", "biva"))
def test_evaluation_pieces_run(method):
    model = tiny(method, "resnet")
    x = data(4)
    lw = iw_log_weights(model, x, 7)
    assert lw.shape == (7, 4)
    assert (log_mean_exp(lw, 0) >= lw.mean(0) - 1e-5).all()  # Jensen, on the same samples
    b = iw_bound(model, x, 10, chunk=4)
    assert b.shape == (4,) and torch.isfinite(b).all()
    res = evaluate(model, lambda: iter([x, data(4, seed=1)]), "cpu", iw_samples=5, au_samples=2)
    assert res["num_examples"] == 8 and len(res["kl_per_layer"]) == len(res["active_units"]) == 2
    assert math.isfinite(res["iw_bound"]) and math.isfinite(res["elbo"])


# ---------------------------------------------------------------------------------------------
# LVAE's precision weighting

def test_precision_weighting_is_the_gaussian_product():
    g = torch.Generator().manual_seed(0)
    mh, mp = torch.randn(2, 5, generator=g, dtype=torch.float64)
    sh, sp = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.2
    mu, sigma = precision_weighted(mh, sh, mp, sp)
    # direct formula
    var = 1 / (1 / sh**2 + 1 / sp**2)
    torch.testing.assert_close(sigma, var.sqrt())
    torch.testing.assert_close(mu, (mh / sh**2 + mp / sp**2) * var)
    # and it is the normalised product N(z|mh,sh) N(z|mp,sp) / N(mh|mp, sh^2+sp^2), for any z
    for z in torch.randn(3, 1, 5, generator=g, dtype=torch.float64):
        lhs = gaussian_logprob(z, mh[None], sh[None]) + gaussian_logprob(z, mp[None], sp[None])
        rhs = gaussian_logprob(z, mu[None], sigma[None]) + gaussian_logprob(mh[None], mp[None], (sh**2 + sp**2).sqrt()[None])
        torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("arch", ARCHS)
def test_lvae_forward_uses_the_merged_posterior(arch):
    """Re-run LVAE's forward by hand (same RNG draws) and check log q, log p and q_mean."""
    model = tiny("lvae", arch).double()
    x = data(4).double()
    torch.manual_seed(7)
    t = model(x)
    ms = model.cfg.min_scale
    torch.manual_seed(7)
    out0, h0 = model.enc[0](x)
    out1, _ = model.enc[1](h0)
    mh0, sh0 = split_gaussian(out0, ms)
    mu2, s2 = split_gaussian(out1, ms)
    z2 = mu2 + s2 * torch.randn_like(mu2)
    mp, sp = split_gaussian(model.gen[0](z2)[0], ms)
    var = 1 / (sh0.pow(-2) + sp.pow(-2))
    mq = (mh0 / sh0**2 + mp / sp**2) * var
    z1 = mq + var.sqrt() * torch.randn_like(mq)
    torch.testing.assert_close(t.q_mean[0], mq)
    torch.testing.assert_close(t.q_mean[1], mu2)
    torch.testing.assert_close(t.log_q[0], gaussian_logprob(z1, mq, var.sqrt()))
    torch.testing.assert_close(t.log_p[0], gaussian_logprob(z1, mp, sp))
    torch.testing.assert_close(t.log_q[1], gaussian_logprob(z2, mu2, s2))


# ---------------------------------------------------------------------------------------------
# Parameter counts

def mlp_params(i, h, o):
    """nets.MLP: Linear(i, h), Linear(h, h), Linear(h, o)."""
    return i * h + h + h * h + h + h * o + o


def test_parameter_counts_tiny_mlp():
    D, h = 64, 16  # 1x8x8 Bernoulli: one logit per pixel
    lvae = mlp_params(D, h, 8) + mlp_params(h, h, 6) + mlp_params(3, h, 8) + mlp_params(4, h, D)
    biva = (mlp_params(D, h, 8) + mlp_params(h + 4, h, 6)  # bottom-up: q(z1_BU|x), q(z2|d1, z1_BU)
            + mlp_params(h + h, h, 8)  # top-down q(z1_TD | h1, d1)
            + mlp_params(3, h, 16)  # p(z1_BU, z1_TD | z2)
            + mlp_params(8 + h, h, D))  # p(x | z1, h1)
    assert count_parameters(tiny("lvae", "mlp")) == lvae
    assert count_parameters(tiny("biva", "mlp")) == biva
    assert isinstance(tiny("lvae", "mlp"), LadderVAE) and isinstance(tiny("biva", "mlp"), BIVA)


# The CIFAR-10 baseline presets land within this fraction of the paper's counts (Table 6).
PARAM_TOLERANCE = 0.15


@pytest.mark.parametrize("name", ["cifar10-lvae-15", "cifar10-biva-15"])
def test_cifar_baseline_presets_match_paper_counts(name):
    p = PRESETS[name]
    cfg = preset_config(name)
    assert cfg.method == p.method in ("lvae", "biva") and cfg.model.depth == 15
    with torch.device("meta"):  # 60-100M parameters, no memory
        n = count_parameters(build_model(cfg.method, cfg.model, (3, 32, 32)))
    assert abs(n / p.paper_params - 1) < PARAM_TOLERANCE, (n, p.paper_params)


def test_mnist_baseline_presets_build():
    for name in ("mnist-mlp-lvae-5", "mnist-mlp-biva-5"):
        cfg = preset_config(name)
        model = build_model(cfg.method, cfg.model, (1, 28, 28))
        assert model.depth == 5
        t = model((torch.rand(2, 1, 28, 28) < 0.5).float())
        assert torch.isfinite(t.log_weight).all()


def test_unknown_baseline_and_skip_rejected():
    with pytest.raises(HVAEError, match="unknown method 'ladder'"):
        build_model("ladder", ARCHS["mlp"], IMG)
    with pytest.raises(HVAEError):
        build_model("lvae", ModelConfig(arch="resnet", num_layers=2, channels=8, blocks=1, data_blocks=1,
                                        skip=True), IMG)
