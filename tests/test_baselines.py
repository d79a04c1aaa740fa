"""Baselines (LVAE, BIVA) and every training method on tiny models, on CPU.

Tiny models: 1x8x8 binary images; MLP latents (4, 3) with 16 hidden units; ResNet 8 maps, 1 block,
2-channel latents at 4x4. Whole file: a few seconds on 2 cores.
"""

import dataclasses
import json
import math

import pytest
import torch

from hvae_fast.models.baselines import BIVA, LadderVAE, precision_weighted
from hvae_fast.cli import main
from hvae_fast.config import OU_METHODS, PRESETS, ModelConfig, preset_config
from hvae_fast.errors import HVAEError
from hvae_fast.training.evaluate import evaluate
from hvae_fast.distributions import gaussian_logprob, split_gaussian
from hvae_fast.models.nets import GatedResBlock
from hvae_fast.models.model import OUSmoothing, build_model, count_parameters
from hvae_fast.models.objectives import elbo, iw_bound, iw_log_weights, iwae_loss, log_mean_exp, training_loss
from hvae_fast.ops.ou import BACKENDS

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
    ou = OUSmoothing(rho=0.9, samples=3, backend=BACKENDS["torch"]) if method in OU_METHODS else None
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


def chain(blocks, x, aux):
    """The reference's DeterministicBlocks: block j reads aux[j] where given; (output, every block's output)."""
    hs = []
    for j, b in enumerate(blocks):
        x = b(x, aux[j] if j < len(aux) else None)
        hs.append(x)
    return x, hs


def ancestral_sample(model, n, seed, method):
    """Ancestral sampling written out from each model's generative equations (module docstrings),
    with the same draws in the same order as the shared StackedVAE.sample: [n, C, H, W] means."""
    g, ms = torch.Generator().manual_seed(seed), model.cfg.min_scale
    z, h, above = torch.randn((n, *model.latent_shapes[-1]), generator=g), None, []
    conv = getattr(model, "conv", False)
    for i in reversed(range(model.depth - 1)):
        if conv:  # stage i+1's generative blocks (reading stage i+2's block outputs) -> p(z_i | d)
            d, h = chain(model.p[i + 1], z, h or [])
            heads = [model.p_head[i]] if method == "lvae" else [model.p_head_bu[i], model.p_head_td[i]]
            mu, raw = (torch.cat(t, 1) for t in zip(*(head(d).chunk(2, dim=1) for head in heads)))
        elif method == "biva":  # g_i([z_{i+1}, h_{i+1}]) -> p(z_i^BU), p(z_i^TD); z_i = [z^BU, z^TD]
            out, h = model.gen[i](z if h is None else torch.cat([z, h], 1))
            mu_b, raw_b, mu_t, raw_t = out.chunk(4, dim=1)
            mu, raw = torch.cat([mu_b, mu_t], 1), torch.cat([raw_b, raw_t], 1)
        else:  # p(z_i | z_{i+1}) from gen_i; HVAE+'s gen_i also reads the latents above z_{i+1}
            out = model.gen[i](torch.cat([z, *above], 1))[0]
            mu, raw = out.chunk(2, dim=1)
            above = [z, *above] if model.cfg.skip else []
        sigma = torch.nn.functional.softplus(raw) + ms
        z = mu + sigma * torch.randn(mu.shape, generator=g)
    if conv:
        params = model.out(chain(model.p[0], z, h or [])[0])
    elif method == "biva":
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
    # BIVA: the layer below the top holds (BU, TD), twice the maps / units. ResNets: the reference's
    # layout, latent_channels + 2 maps below the top, the image halved in stage 0 and in the top stage.
    z0, z1 = ((4, 4, 4), (2, 2, 2)) if arch == "resnet" else ((4,), (3,))
    assert model.latent_shapes == [((2 if method == "biva" else 1) * z0[0], *z0[1:]), z1]
    g = torch.Generator().manual_seed(0)
    assert model.sample(3, generator=g).shape == (3, *IMG)
    assert model.sample(3, generator=g, mean=False).shape == (3, *IMG)
    # The ladders smooth their generator layers only: the stacked VAE's inference smoothing is refused.
    with pytest.raises(HVAEError, match="--ou-inference"):
        model(data(B), OUSmoothing(0.9, 2, BACKENDS["torch"], smooth_inference=True))


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


def test_lvae_mlp_forward_uses_the_precision_weighted_posterior():
    """Re-run the MLP LVAE's forward by hand (same RNG draws) and check log q, log p and q_mean."""
    model = tiny("lvae", "mlp").double()
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


def sample(mu, sigma):
    return mu + sigma * torch.randn_like(mu)


def test_lvae_resnet_forward_is_the_references_learned_merge():
    """The ResNet LVAE by hand (the reference's LvaeStage): a deterministic bottom-up pass h_i,
    q(z_i | merge_i(h_i, d_i)) with d_i the generative features from above, p(z_i | d_i)."""
    model = tiny("lvae", "resnet").double()
    x, ms = data(4).double(), model.cfg.min_scale
    torch.manual_seed(7)
    t = model(x)
    torch.manual_seed(7)
    h0 = chain(model.q[0], x, [])[0]
    h1 = chain(model.q[1], h0, [h0])[0]  # stage 1's blocks also read stage 1's input
    mu2, s2 = split_gaussian(model.q_head[1](model.merge[1](h1)), ms)
    z2 = sample(mu2, s2)
    d, skips = chain(model.p[1], z2, [])
    mp, sp = split_gaussian(model.p_head[0](d), ms)
    mq, sq = split_gaussian(model.q_head[0](model.merge[0](h0, d)), ms)
    z1 = sample(mq, sq)
    torch.testing.assert_close(t.q_mean, [mq, mu2])
    torch.testing.assert_close(t.log_q, [gaussian_logprob(z1, mq, sq), gaussian_logprob(z2, mu2, s2)])
    torch.testing.assert_close(t.log_p, [gaussian_logprob(z1, mp, sp), gaussian_logprob(z2, 0 * z2, 1 + 0 * z2)])
    # p(x | z_1): stage 0's blocks, block j also reading block j of stage 1
    torch.testing.assert_close(t.log_px, model.likelihood.logprob(model.out(chain(model.p[0], z1, skips)[0]), x))
    assert z1.shape == (4, 4, 4, 4) and z2.shape == (4, 2, 2, 2) and d.shape == (4, 8, 4, 4)


def test_biva_resnet_forward_follows_the_reference_stages():
    """The ResNet BIVA by hand (the reference's BivaIntermediateStage / BivaTopStage): stochastic
    BU path, TD path reading it, top latent from both; TD posterior from merge(TD features, d)."""
    model = tiny("biva", "resnet").double()
    x, ms = data(4).double(), model.cfg.min_scale
    torch.manual_seed(5)
    t = model(x)
    torch.manual_seed(5)
    hb0 = chain(model.q_bu[0], x, [])[0]
    ht0 = chain(model.q_td[0], x, [hb0])[0]  # the TD blocks read the BU output (upsampled)
    mb, sb = split_gaussian(model.q_head_bu[0](hb0), ms)
    zb = sample(mb, sb)
    aux = torch.cat([hb0, ht0], 1)
    hb1 = chain(model.q_bu[1], zb, [aux])[0]  # the BU path runs on the BU sample
    ht1 = chain(model.q_td[1], ht0, [hb1])[0]
    m2, s2 = split_gaussian(model.q_head_bu[1](model.q_top(torch.cat([hb1, ht1], 1))), ms)
    z2 = sample(m2, s2)
    d, skips = chain(model.p[1], z2, [])
    mt, st = split_gaussian(model.q_head_td[0](model.merge[0](ht0, d)), ms)
    zt = sample(mt, st)
    pb, pt = split_gaussian(model.p_head_bu[0](d), ms), split_gaussian(model.p_head_td[0](d), ms)
    torch.testing.assert_close(t.q_mean, [torch.cat([mb, mt], 1), m2])
    torch.testing.assert_close(t.log_q[0], gaussian_logprob(zb, mb, sb) + gaussian_logprob(zt, mt, st))
    torch.testing.assert_close(t.log_p[0], gaussian_logprob(zb, *pb) + gaussian_logprob(zt, *pt))
    torch.testing.assert_close(t.log_q[1], gaussian_logprob(z2, m2, s2))
    z1 = torch.cat([zb, zt], 1)
    torch.testing.assert_close(t.log_px, model.likelihood.logprob(model.out(chain(model.p[0], z1, skips)[0]), x))


def test_gated_block_by_hand():
    """nets.GatedResBlock against its formula with plain convolutions; weight norm w = g v / |v|."""
    torch.manual_seed(0)
    act = torch.nn.functional.elu
    b = GatedResBlock(6, 6, 3, aux_ch=4).double()
    x, a = torch.randn(2, 6, 5, 5, dtype=torch.double), torch.randn(2, 4, 5, 5, dtype=torch.double)
    p = b.conv1.conv.parametrizations.weight
    torch.testing.assert_close(b.conv1.conv.weight, p.original0 * p.original1 / torch.linalg.vector_norm(p.original1, dim=(1, 2, 3), keepdim=True))
    c = lambda m, t, pad: torch.nn.functional.conv2d(t, m.conv.weight, m.conv.bias, padding=pad)
    y = c(b.conv1, act(x), 1) + c(b.aux, act(a), 0)
    u, v = c(b.conv2, act(y), 1).chunk(2, 1)
    torch.testing.assert_close(b(x, a), u * torch.sigmoid(v) + x)
    # resampling: stride 2 down ('SAME': ceil), transposed x2 up, cin > ch keeps the first ch maps
    x = x.float()
    assert GatedResBlock(6, 4, 5, stride=2)(x).shape == (2, 4, 3, 3)
    assert GatedResBlock(6, 4, 3, stride=2, up=True)(x).shape == (2, 4, 10, 10)
    assert GatedResBlock(6, 6, 3, aux_ch=4, aux_ratio=0.5)(torch.randn(1, 6, 8, 8), torch.randn(1, 4, 4, 4)).shape == (1, 6, 8, 8)


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


def conv_params(i, o, k):
    """A weight-normalised conv (nets.WNConv): weight, bias and one gain per output map."""
    return i * o * k * k + 2 * o


def block_params(cin, ch, k, aux_ch=0, aux_k=1):
    """nets.GatedResBlock: conv1 (cin -> ch), conv2 (ch -> 2 ch, the gate), the aux conv."""
    return conv_params(cin, ch, k) + conv_params(ch, 2 * ch, k) + (conv_params(aux_ch, ch, aux_k) if aux_ch else 0)


def test_parameter_counts_tiny_resnet():
    """Tiny ResNet (8 maps, 1 block per stage, 2 layers on 1x8x8): stage 0 has 5x5 kernels and a
    4x4x4 latent, the top 3x3 kernels and 2x2x2. The BIVA authors' code, given the same stages,
    counts 19,706 (LVAE) and 27,298 (BIVA) parameters too."""
    c, b = conv_params, block_params
    lvae = (b(1, 8, 5) + b(8, 8, 3, aux_ch=8)  # inference blocks; stage 1's read stage 1's input
            + b(8, 8, 5, aux_ch=8) + b(8, 8, 3)  # merges (the top's has no top-down input)
            + c(8, 8, 4) + c(8, 4, 2) + c(8, 8, 4)  # q(z_1), q(z_2), p(z_1 | d): kernels as large as the map
            + b(4, 8, 5, aux_ch=8) + b(2, 8, 3)  # generative blocks; stage 0's reads stage 1's
            + c(8, 1, 1))  # p(x | d)
    biva = (b(1, 8, 5) + b(4, 8, 3, aux_ch=16)  # BU blocks: x, then z_1^BU and [BU, TD] features
            + b(1, 8, 5, aux_ch=8, aux_k=5) + b(8, 8, 3, aux_ch=8, aux_k=3)  # TD blocks read BU (at half size)
            + b(16, 8, 3) + b(8, 8, 3, aux_ch=8)  # top merge of BU and TD; the TD posterior's merge
            + c(8, 8, 4) + c(8, 4, 2) + 3 * c(8, 8, 4)  # q(z_1^BU), q(z_2), q(z_1^TD), p(z_1^BU), p(z_1^TD)
            + b(8, 8, 5, aux_ch=8) + b(2, 8, 3) + c(8, 1, 1))
    assert (lvae, biva) == (19706, 27298)
    assert count_parameters(tiny("lvae", "resnet")) == lvae
    assert count_parameters(tiny("biva", "resnet")) == biva


# Parameter counts of the BIVA authors' code (biva-pytorch, get_deep_vae_cifar, 10-component
# logistic mixture: 100 output maps), instantiated once by hand; the paper reports 59.5M and 103M.
AUTHORS_PARAMS = {"cifar10-lvae-15": 59_576_896, "cifar10-biva-15": 102_948_560}


@pytest.mark.parametrize("name", ["cifar10-lvae-15", "cifar10-biva-15"])
def test_cifar_baseline_presets_match_the_reference(name):
    p = PRESETS[name]
    cfg = preset_config(name)
    assert cfg.method == p.method in ("lvae", "biva") and cfg.model.depth == 15
    with torch.device("meta"):  # 60-100M parameters, no memory
        model = build_model(cfg.method, cfg.model, (3, 32, 32))
    n = count_parameters(model)
    assert n == AUTHORS_PARAMS[name] and abs(n / p.paper_params - 1) < 0.05, (n, p.paper_params)
    # the reference's layout: 3 blocks of 96 maps per stage, latents 38, 36, .., 10 maps at 16x16 (10 layers),
    # 8x8 (4), 4x4 (the top)
    assert [s.blocks for s in model.stages] == [3] * 15 and cfg.model.channels == 96
    assert [s.z for s in model.stages] == list(range(38, 9, -2))
    assert [s.hw for s in model.stages] == [(16, 16)] * 10 + [(8, 8)] * 4 + [(4, 4)]


def test_cifar_baseline_forward_resolutions():
    """A forward pass of the CIFAR-10 layout (shrunk to 4 maps): latent and block output sizes, by hooks."""
    for name in ("cifar10-lvae-15", "cifar10-biva-15"):
        cfg = preset_config(name)
        cfg.model.channels = 4
        torch.manual_seed(0)
        model = build_model(cfg.method, cfg.model, (3, 32, 32))
        sizes = {}
        for stage, blocks in enumerate(model.p):
            for j, blk in enumerate(blocks):
                blk.register_forward_hook(lambda m, i, o, key=(stage, j): sizes.update({key: o.shape[-1]}))
        t = model(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert [m.shape[1:] for m in t.q_mean] == [s for s in model.latent_shapes]
        assert [m.shape[-1] for m in t.q_mean] == [16] * 10 + [8] * 4 + [4]
        # generative stage i ends at stage i's input size: 32 at the bottom, 16, 8 above the halvings
        assert [sizes[(i, 2)] for i in range(15)] == [32] + [16] * 10 + [8] * 4
        assert torch.isfinite(t.log_weight).all() and model.sample(2).shape == (2, 3, 32, 32)


def test_mnist_baseline_presets_build():
    for name in ("mnist-mlp-lvae-5", "mnist-mlp-biva-5"):
        cfg = preset_config(name)
        model = build_model(cfg.method, cfg.model, (1, 28, 28))
        assert model.depth == 5
        t = model((torch.rand(2, 1, 28, 28) < 0.5).float())
        assert torch.isfinite(t.log_weight).all()


def test_unknown_baseline_and_skip_rejected():
    with pytest.raises(HVAEError, match="unknown method 'nvae'"):
        build_model("nvae", ARCHS["mlp"], IMG)
    with pytest.raises(HVAEError):
        build_model("lvae", ModelConfig(arch="resnet", num_layers=2, channels=8, blocks=1, data_blocks=1,
                                        skip=True), IMG)


@pytest.mark.parametrize("dataset, preset, shrink", [
    ("mnist", "mnist-mlp-lvae-5", []), ("mnist", "mnist-mlp-biva-5", []),
    ("cifar10", "cifar10-lvae-15", ["--num-layers", "2", "--channels", "4", "--blocks", "1", "--data-blocks", "1"]),
    ("cifar10", "cifar10-biva-15", ["--num-layers", "2", "--channels", "4", "--blocks", "1", "--data-blocks", "1"])])
def test_baselines_train_through_the_cli(dataset, preset, shrink, shared_data, tmp_path):
    method = PRESETS[preset].method
    run = tmp_path / "run"
    code = main(["train", dataset, "--preset", preset, "--method", method, *shrink, "--steps", "4", "--batch-size", "8",
                 "--log-every", "2", "--eval-every", "4", "--eval-examples", "16", "--sample-every", "4",
                 "--checkpoint-every", "4", "--device", "cpu", "--data-dir", str(shared_data), "--out", str(run),
                 "--no-progress"])
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["method"], cfg["preset"]) == (method, preset)
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(math.isfinite(r["loss"]) for r in train)
    assert len(train[-1]["kl_per_layer"]) == (5 if dataset == "mnist" else 2)
    assert (run / "samples-0000004.png").exists()


def test_baseline_resnet_layout_errors():
    cfg = ModelConfig(arch="resnet", num_layers=4, channels=4, blocks=1, data_blocks=1, latent_channels=2)
    with pytest.raises(HVAEError, match="drop --latent-stride"):
        build_model("lvae", dataclasses.replace(cfg, latent_stride=2), IMG)
    with pytest.raises(HVAEError, match="use fewer layers"):
        build_model("biva", cfg, (1, 4, 4))  # 4x4 halved three times
