"""Fidelity to the paper (issue 11): HVAE+'s stochastic skips, the 14x14 MNIST/OMNIGLOT ResNets,
IWAE's k and its shared encoder pass, OMNIGLOT's validation split, one active-unit estimator, MLP
depth from the CLI, and the OMNIGLOT MLP presets."""

import json

import numpy as np
import pytest
import torch

from hvae_fast import data as D
from hvae_fast.training import trainer as trainer_mod
from hvae_fast.cli import main
from hvae_fast.config import PAPER_STEPS, PRESETS, ModelConfig, RunConfig, TrainConfig, preset_config
from hvae_fast.distributions import repeat_batch
from hvae_fast.errors import HVAEError
from hvae_fast.training.evaluate import evaluate
from hvae_fast.models.model import HierarchicalVAE, OUSmoothing, build_model, count_parameters
from hvae_fast.models.nets import ResBlock
from hvae_fast.models.objectives import iw_log_weights, training_loss
from hvae_fast.ops.ou import BACKENDS

from datatools import synthetic, write_chardata  # noqa: F401

TORCH = BACKENDS["torch"]
IMG = (1, 8, 8)


def skip_model(arch):
    if arch == "mlp":
        cfg = ModelConfig(arch="mlp", latent_sizes=(5, 4, 3), hidden_sizes=(16, 12, 8), skip=True)
    else:
        cfg = ModelConfig(arch="resnet", num_layers=3, channels=8, blocks=1, data_blocks=1, latent_channels=2,
                          latent_stride=2, skip=True)
    torch.manual_seed(0)
    return HierarchicalVAE(cfg, IMG)


def binary(B, seed=0):
    return torch.bernoulli(torch.full((B, *IMG), 0.3), generator=torch.Generator().manual_seed(seed))


def inputs_of(module, store):
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


# ------------------------------------------------------------------------------------------------
# HVAE+: stochastic skip connections
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_hvae_plus_decoder_and_generators_read_every_latent_above(arch):
    m, x = skip_model(arch), binary(4)
    torch.manual_seed(1)
    zs = m.encode(x)[0]
    px_in, gen0_in = [], []
    hooks = [inputs_of(m.px, px_in), inputs_of(m.gen[0], gen0_in)]
    torch.manual_seed(1)
    m(x)
    for h in hooks:
        h.remove()
    flat = lambda ts: torch.cat([t.flatten(1) if arch == "mlp" else t for t in ts], 1)  # noqa: E731
    # p(x|z_1) reads [z_1, z_2, z_3]: the top latent's samples among them; p(z_1|z_2) reads [z_2, z_3].
    assert torch.equal(px_in[0], flat(zs))
    assert torch.equal(gen0_in[0], flat(zs[1:]))


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_training_skips_carry_the_unsmoothed_posterior_samples(arch):
    m, x, K = skip_model(arch), binary(4), 3
    torch.manual_seed(2)
    zs = m.encode(x)[0]
    px_in, gen0_in = [], []
    hooks = [inputs_of(m.px, px_in), inputs_of(m.gen[0], gen0_in)]
    torch.manual_seed(2)
    m(x, OUSmoothing(0.5, K, TORCH))
    for h in hooks:
        h.remove()
    c1 = zs[1].shape[1]
    smoothed, skipped = gen0_in[0][:, :c1], gen0_in[0][:, c1:]
    # Only gen_0's own input z_2 is smoothed (K correlated samples around it); z_3 travels as sampled,
    # K times, not a K-average; p(x|z_1) gets exactly the posterior samples, as in evaluation.
    assert gen0_in[0].shape[0] == K * x.shape[0]
    assert torch.equal(skipped, repeat_batch(zs[2], K))
    assert not torch.allclose(smoothed, repeat_batch(zs[1], K))
    assert torch.equal(px_in[0], torch.cat(zs, 1))


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_rho_one_hvae_plus_loss_equals_the_vae_plus_loss(arch):
    m, x = skip_model(arch), binary(4)
    torch.manual_seed(3)
    vae, _ = training_loss(m, x, "vae", None, 1.0, 0.0, 1)
    vae.backward()
    g_vae = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch.manual_seed(3)
    hvae, _ = training_loss(m, x, "hvae", OUSmoothing(1.0, 4, TORCH), 1.0, 0.0, 1)
    hvae.backward()
    torch.testing.assert_close(hvae, vae, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_vae, (p.grad for p in m.parameters())):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_hvae_plus_samples_through_the_same_skips():
    m = skip_model("resnet")
    got = m.sample(3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z3 = torch.randn((3, *m.z_shapes[2]), generator=g)
    mu, sigma = _gauss(m.gen[1](z3)[0], m.cfg.min_scale)
    z2 = mu + sigma * torch.randn(mu.shape, generator=g)
    mu, sigma = _gauss(m.gen[0](torch.cat([z2, z3], 1))[0], m.cfg.min_scale)
    z1 = mu + sigma * torch.randn(mu.shape, generator=g)
    torch.testing.assert_close(got, m.likelihood.mean(m.px(torch.cat([z1, z2, z3], 1))[0]))


def _gauss(out, ms):
    mu, raw = out.chunk(2, 1)
    return mu, torch.nn.functional.softplus(raw) + ms


# ------------------------------------------------------------------------------------------------
# MNIST / OMNIGLOT ResNets: blocks at 14x14, latents 8x7x7
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, blocks_hw, z_shape", [("mnist-resnet", (14, 14), (8, 7, 7)),
                                                      ("omniglot-resnet", (14, 14), (8, 7, 7))])
def test_mnist_resnet_blocks_run_at_14x14_with_8x7x7_latents(name, blocks_hw, z_shape):
    p = PRESETS[name]
    m = build_model("hvae", p.model, D.image_shape(p.dataset))
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, a, out, n=n: seen.update({n: out.shape}))
             for n, mod in m.named_modules() if isinstance(mod, ResBlock)]
    n_blocks = len(hooks)
    torch.manual_seed(0)
    t = m(torch.bernoulli(torch.full((2, 1, 28, 28), 0.3)))
    for h in hooks:
        h.remove()
    assert n_blocks == 4 * 5 + 3 * 5 + 5 and len(seen) == n_blocks  # 4 encoders, 3 generators, p(x|z_1); all ran
    assert {tuple(s[-2:]) for s in seen.values()} == {blocks_hw}
    assert all(tuple(s) == z_shape for s in m.z_shapes)
    assert [tuple(q.shape[1:]) for q in t.q_mean] == [z_shape] * 4


def test_cifar_resnet_blocks_stay_at_16x16():
    p = PRESETS["cifar10-resnet-3"]
    cfg = ModelConfig(**{**p.model.__dict__, "channels": 8, "blocks": 1, "data_blocks": 1})
    m = build_model("hvae", cfg, (3, 32, 32))
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, a, out: seen.append(tuple(out.shape[-2:])))
             for mod in m.modules() if isinstance(mod, ResBlock)]
    m(torch.rand(2, 3, 32, 32) * 2 - 1)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {(16, 16)} and m.z_shapes[0] == (8, 16, 16)


def test_latent_stride_must_be_a_power_of_two():
    cfg = ModelConfig(arch="resnet", num_layers=2, channels=4, blocks=1, data_blocks=1, latent_stride=3)
    with pytest.raises(HVAEError, match="power of two"):
        HierarchicalVAE(cfg, (1, 12, 12))


# ------------------------------------------------------------------------------------------------
# IWAE: k = 5 by default, one encoder pass per example
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_iwae_bound_equals_the_repeated_input_computation_and_encodes_b_rows(arch):
    m, x, k = skip_model(arch), binary(5), 4
    rows = []
    hook = inputs_of(m.enc[0], rows)
    torch.manual_seed(4)
    lw = iw_log_weights(m, x, k)
    hook.remove()
    assert [r.shape[0] for r in rows] == [x.shape[0]]  # q(z_1|x)'s net saw B rows, not k*B
    # The old computation: the whole model on k copies of x. Same noise (the same draws in the same
    # order), so the k-sample log weights agree to float rounding.
    torch.manual_seed(4)
    t = m(repeat_batch(x, k))
    ref = (t.log_px + sum(t.log_p) - sum(t.log_q)).view(k, x.shape[0])
    torch.testing.assert_close(lw, ref, rtol=1e-5, atol=1e-4)
    assert lw.shape == (k, x.shape[0]) and not torch.allclose(lw[0], lw[1])


def test_iwae_trains_with_the_papers_five_samples_by_default(capsys):
    assert TrainConfig().iw_samples_train == 5
    assert main(["train", "binarized-mnist", "--method", "iwae", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["iw_samples_train"] == 5
    with pytest.raises(HVAEError, match="--iw-samples-train is IWAE's k"):
        RunConfig(method="vae", train=TrainConfig(iw_samples_train=3)).validate()
    RunConfig(method="vae").validate()  # the default does not trip the check


# ------------------------------------------------------------------------------------------------
# OMNIGLOT validation: the LAST 1,345 of the seed-123 permutation
# ------------------------------------------------------------------------------------------------

def test_omniglot_validation_is_the_last_1345_of_the_seed_123_permutation(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_CACHE_DIR", str(tmp_path / "parsed"))
    synthetic(monkeypatch, "omniglot", train=2000, test=10)
    rng = np.random.default_rng(1)
    write_chardata(tmp_path / "omniglot" / "chardata.mat", rng.random((2000, 28, 28)), rng.random((10, 28, 28)))
    valid = D.load_dataset("omniglot", "valid", data_dir=tmp_path, download=False)
    train = D.load_dataset("omniglot", "train", data_dir=tmp_path, download=False)
    perm = np.random.RandomState(123).permutation(2000)
    assert np.array_equal(valid.indices.numpy(), np.sort(perm[-1345:]))
    assert np.array_equal(train.indices.numpy(), np.sort(perm[:655]))
    assert len(set(perm[:1345]) - set(valid.indices.tolist())) > 0  # not the first 1,345


# ------------------------------------------------------------------------------------------------
# Active units: periodic validation uses eval's estimator
# ------------------------------------------------------------------------------------------------

def test_validation_counts_active_units_like_eval(monkeypatch, shared_data, tmp_path):
    import inspect

    seen = {}
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **kw: seen.update(kw) or {})
    cfg = RunConfig(dataset="binarized-mnist", preset="tiny", method="vae",
                    model=ModelConfig(arch="mlp", latent_sizes=(4,), hidden_sizes=(8,)),
                    train=TrainConfig(steps=1, batch_size=8, eval_examples=16), device="cpu")
    trainer_mod.Trainer(cfg, tmp_path / "run", data_dir=shared_data, progress=False).validate()
    assert seen["au_samples"] == inspect.signature(evaluate).parameters["au_samples"].default


# ------------------------------------------------------------------------------------------------
# MLP depth x width from the CLI; OMNIGLOT MLP presets; the paper's budgets
# ------------------------------------------------------------------------------------------------

def test_mlp_deterministic_depth_parameter_count_by_hand():
    cfg = ModelConfig(arch="mlp", latent_sizes=(4, 3), hidden_sizes=(8, 6), hidden_layers=3)
    m = HierarchicalVAE(cfg, (1, 6, 6))
    lin = lambda i, o: i * o + o  # noqa: E731
    enc0 = lin(36, 8) + 2 * lin(8, 8) + lin(8, 2 * 4)  # x (36 pixels) -> 3 layers of 8 -> (mu, sigma) of z_1
    enc1 = lin(4, 6) + 2 * lin(6, 6) + lin(6, 2 * 3)
    gen0 = lin(3, 8) + 2 * lin(8, 8) + lin(8, 2 * 4)  # p(z_1|z_2) has layer 1's width
    px = lin(4, 8) + 2 * lin(8, 8) + lin(8, 36)
    assert count_parameters(m) == enc0 + enc1 + gen0 + px == 1424
    assert sum(isinstance(l, torch.nn.Linear) for l in m.enc[0].body) == 3


def test_depth_and_width_flags_reach_the_model(capsys):
    assert main(["train", "binarized-mnist", "--latent-sizes", "10,10,10", "--hidden-sizes", "100,100,100",
                 "--hidden-layers", "1", "--print-config"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["latent_sizes"], model["hidden_sizes"], model["hidden_layers"]) == ([10] * 3, [100] * 3, 1)


@pytest.mark.parametrize("name, latents", [("omniglot-mlp-40x4", (40,) * 4), ("omniglot-mlp-200x3", (200,) * 3)])
def test_omniglot_mlp_presets(name, latents):
    cfg = preset_config(name).validate()
    assert cfg.dataset == "omniglot" and cfg.model.latent_sizes == latents
    assert cfg.model.hidden_sizes == (200,) * len(latents) and cfg.model.hidden_layers == 2
    assert cfg.train.steps == PAPER_STEPS["fig1"] == 100_000
    m = build_model("hvae", cfg.model, D.image_shape("omniglot"))
    assert m(torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))).log_px.shape == (2,)


def test_paper_budgets():
    assert PAPER_STEPS == {"fig1": 100_000, "fig3": 100_000, "table3": 1_000_000, "table4": 1_000_000}
    assert "--steps 1000000" in PRESETS["mnist-mlp-40x4"].description  # Table 4's preset
    assert "--steps 1000000" in PRESETS["mnist-mlp-64-32-16-8"].description  # Table 3's preset
