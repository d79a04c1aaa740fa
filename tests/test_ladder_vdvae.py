"""The VDVAE-style top-down ladder (``--method ladder``, models/ladder.py; issue 22.2).

The float64 reference re-derives the smoothed ELBO of a tiny ladder from the equations of ladder.py's
docstring with explicitly given noise (the posterior draws fed through ``normal_like``, the OU seeds
through ``OUSmoothing.seed``), calling the model's blocks as functions but none of its forward,
``_state_below``, ``_prior_block``, ``generator_head`` or the smoothing helper.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hvae_fast.cli import main
from hvae_fast.config import PRESETS, ModelConfig, OUConfig, RunConfig, preset_config
from hvae_fast.errors import HVAEError
from hvae_fast.models import ladder
from hvae_fast.models.model import OUSmoothing, build_model, count_parameters
from hvae_fast.models.objectives import elbo_loss, training_loss
from test_ladder_smoothing import TORCH, averaged_head, binary, gauss, log_normal, ou_inputs

IMG = (1, 8, 8)
# (0, 2, 1): the ladder starts at 4x4 (two latents), then one at 2x2 (1x1 convs); (1, 1, 2): 8x8, 4x4, 2x2 (two).
LAYOUTS = {"0,2,1": (0, 2, 1), "1,1,2": (1, 1, 2)}


def tiny(layout=(0, 2, 1), shape=IMG, likelihood="bernoulli", seed=0):
    """A tiny ladder whose zero-initialised prior blocks are perturbed, so every generator layer reads z_{i+1}."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="resnet", latents_per_scale=layout, channels=8, blocks=1, latent_channels=2,
                      likelihood=likelihood)
    m = build_model("ladder", cfg, shape)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_ladder(m, x, eps_q, rho, K, seeds, target):
    """The ladder's smoothed ELBO [N]: eps_q, the posterior noise of layers L-1..0 (top-down); seeds[j]:
    the OU seed of the j-th smoothed layer, top-down (layer L-2 first)."""
    ms, Z, L = m.cfg.min_scale, m.cfg.latent_channels, m.depth
    n = m.cfg.latents_per_scale
    scale = [s for s in range(len(n)) for _ in range(n[s])]
    a, acts = m.enc_in(x), {}
    for s in range(scale[0], len(n)):  # the encoder: blocks per scale, 2x2 average pooling between
        a = m.enc[s](a if s == scale[0] else F.avg_pool2d(a, 2))
        acts[s] = a

    def state_below(i, u, z):  # s_{i-1} = up(R_i(u_i + proj_i(z_i)))
        t = m.res[i](u + m.proj[i](z))
        f = 2 ** (scale[i] - scale[i - 1]) if i else 1
        return t.repeat_interleave(f, 2).repeat_interleave(f, 3)  # nearest upsampling

    eps_q, elbo = list(eps_q), 0.0
    s = m.bias.expand(x.shape[0], -1, -1, -1)
    for i in reversed(range(L)):
        if i < L - 1:
            out = m.p[i](s)
            u = s + out[:, 2 * Z:]  # the prior's feature joins the state
        else:
            u = s
        mu, sigma = gauss(m.q[i](torch.cat([s, acts[scale[i]]], 1)), ms)
        z = mu + sigma * eps_q.pop(0)
        elbo = elbo - log_normal(z, mu, sigma)
        if i == L - 1:
            elbo = elbo - 0.5 * (z ** 2).flatten(1).sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)
        else:
            # generator layer i on K correlated samples of z_{i+1}; u_{i+1} from the real samples, repeated
            heads = [m.p[i](state_below(i + 1, u_above, zk))[:, :2 * Z]
                     for zk in ou_inputs(z_above, *q_above, rho, K, seeds[L - 2 - i])]
            elbo = elbo + averaged_head(heads, z, target, ms)
        s = state_below(i, u, z)
        z_above, q_above, u_above = z, (mu, sigma), u
    logits = m.out(s)
    return elbo - F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


@pytest.mark.parametrize("target", ["mean-std", "ratio"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_smoothed_ladder_elbo_and_gradients_match_a_float64_reference(layout, target, monkeypatch):
    m = tiny(LAYOUTS[layout]).double()
    B, K, rho = 4, 3, 0.6
    seeds = [101 + j for j in range(m.depth - 1)]
    x = binary(B, IMG).double()
    g = torch.Generator().manual_seed(1)
    eps = [torch.randn(B, *m.z_shapes[i], generator=g, dtype=torch.float64) for i in reversed(range(m.depth))]
    fed = list(eps)

    def given_noise(mu):
        e = fed.pop(0)
        assert e.shape == mu.shape, "the model draws its posterior noise in another order than the reference"
        return e

    given_seeds = list(seeds)
    monkeypatch.setattr(ladder, "normal_like", given_noise)
    monkeypatch.setattr(OUSmoothing, "seed", lambda self: given_seeds.pop(0))
    got = m(x, OUSmoothing(rho, K, TORCH, target)).log_weight
    assert not fed and not given_seeds
    ref = reference_ladder(m, x, eps, rho, K, seeds, target)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    params = list(m.parameters())
    g_got = torch.autograd.grad(got.mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.mean(), params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    fed[:] = eps  # the smoothing changes the objective at this rho
    assert (m(x).log_weight - got).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_terms_and_samples(layout):
    m = tiny(LAYOUTS[layout])
    n, L = LAYOUTS[layout], sum(LAYOUTS[layout])
    assert m.depth == L and m.z_shapes == [(2, 8 >> s, 8 >> s) for s in range(len(n)) for _ in range(n[s])]
    x = binary(5, IMG)
    t = m(x)
    assert t.log_px.shape == (5,) and len(t.log_q) == len(t.log_p) == len(t.q_mean) == L
    assert all(v.shape == (5,) for v in t.log_q + t.log_p)
    assert [tuple(q.shape[1:]) for q in t.q_mean] == m.z_shapes
    torch.testing.assert_close(t.log_weight, t.log_px - sum(t.kl), rtol=1e-5, atol=1e-3)
    assert m(x, k=3).log_px.shape == (15,)
    s = m.sample(3, torch.Generator().manual_seed(0))
    assert s.shape == (3, *IMG) and ((s >= 0) & (s <= 1)).all()
    # CIFAR-shaped: the logistic mixture's parameters come out at the image's size.
    mc = tiny((0, 1, 1), (3, 8, 8), "logistic")
    xc = torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5 - 1
    assert mc(xc).log_px.shape == (2,) and mc.sample(2).shape == (2, 3, 8, 8)


def test_layout_errors_are_one_line():
    for cfg, msg in [(ModelConfig(arch="mlp", latent_sizes=(4,), hidden_sizes=(8,)), "--method ladder is convolutional"),
                     (ModelConfig(arch="resnet", latents_per_scale=(1, 0)), "the coarsest resolution needs a latent"),
                     (ModelConfig(arch="resnet", latents_per_scale=(1, 1, 1, 1)), "halves the image 3 times; 6x6")]:
        with pytest.raises(HVAEError, match=msg):
            build_model("ladder", cfg, (1, 6, 6))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generator_inputs_head_and_parameters_describe_each_generator_layer(layout):
    # generator_head on generator_inputs gives the plain forward's log p(z_i | .) (same seed, same
    # samples), and generator_parameters(i) are exactly what generator_head(i, ...) depends on.
    m, x = tiny(LAYOUTS[layout]), binary(3, IMG)
    torch.manual_seed(4)
    terms = m(x)
    torch.manual_seed(4)
    layers = m.generator_inputs(x)
    assert [lay[0] for lay in layers] == list(reversed(range(m.depth - 1)))
    names = {p: n for n, p in m.named_parameters()}
    for i, z_above, _, z, state in layers:
        mean_raw, scale_raw = m.generator_head(i, z_above.detach(), *(s.detach() for s in state))
        sigma = F.softplus(scale_raw) + m.cfg.min_scale
        torch.testing.assert_close(log_normal(z, mean_raw, sigma), terms.log_p[i], rtol=1e-5, atol=1e-4)
        grads = torch.autograd.grad(mean_raw.sum() + sigma.sum(), list(m.parameters()), allow_unused=True)
        used = {names[p] for p, g in zip(m.parameters(), grads) if g is not None and g.abs().sum() > 0}
        assert used == {names[p] for p in m.generator_parameters(i)}, i


def test_smoothed_and_plain_forwards_share_posterior_samples_and_rho_one_is_plain():
    # The OU seeds are drawn after the whole top-down pass: with one seed, the smoothed forward's
    # posterior samples (so log q, p(z_L), p(x | .)) are the plain forward's; rho < 1 changes only
    # the intermediate log p terms; rho = 1 gives the plain ELBO and gradients; ou=None (evaluation)
    # is the plain forward.
    m, x = tiny((0, 2, 1)), binary(4, IMG)
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
    assert all(torch.equal(a, b) for a, b in zip(smooth.log_q + smooth.q_mean, plain.log_q + plain.q_mean))
    # (each beyond float32 rounding, ~1e-5 here: the scaled-down residual branches make z_{i+1}'s pull weak at init)
    assert all((smooth.log_p[i] - plain.log_p[i]).abs().max() > 1e-3 for i in range(m.depth - 1))
    assert torch.equal(again.log_weight, plain.log_weight)


def test_recompute_gives_the_same_gradients():
    m, x = tiny((0, 2, 1)), binary(4, IMG)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(9)
        loss, _ = training_loss(m, x, "ladder", OUSmoothing(0.8, 3, TORCH, recompute=recompute), 1.0, 0.0, 1)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_presets_are_cpu_sized_plain_ladders_and_take_every_smoothing_flag():
    for name, shape, depth, top in [("mnist-vdvae-ladder-6", (1, 28, 28), 6, (4, 7, 7)),
                                    ("cifar10-vdvae-ladder-6", (3, 32, 32), 6, (8, 4, 4))]:
        cfg = preset_config(name)
        assert cfg.method == PRESETS[name].method == "ladder" and not cfg.smooths()
        m = build_model("ladder", cfg.model, shape)
        assert m.depth == depth == cfg.model.num_layers and m.latent_shapes[-1] == top
        assert count_parameters(m) < 200_000, name
    assert count_parameters(build_model("ladder", preset_config("mnist-vdvae-ladder-6").model, (1, 28, 28))) == 36_641
    model = preset_config("mnist-vdvae-ladder-6").model
    for ou in [OUConfig(rho=0.8, samples=3, target="ratio", backend="torch", recompute=True),
               OUConfig(rho=1.0, rho_schedule="linear:0.5:1:100"), OUConfig(rho=0.9, rho_control=25.0)]:
        assert RunConfig(method="ladder", model=model, ou=ou).validate().smooths()
    with pytest.raises(HVAEError, match="--ou-inference smooths the stacked VAE's inference network"):
        RunConfig(method="ladder", model=model, ou=OUConfig(smooth_inference=True)).validate()
    with pytest.raises(HVAEError, match="--method ladder is convolutional"):
        RunConfig(method="ladder").validate()  # the default model is an MLP


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory, one_thread):  # two threads on a busy 2-core machine: 100x slower steps
    """A 3-step smoothed run from the CLI: --method ladder alone picks mnist-vdvae-ladder-6, shrunk."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "binarized_mnist").is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}: set HVAE_DATA_DIR")
    out = tmp_path_factory.mktemp("vdvae") / "run"
    code = main(["train", "binarized-mnist", "--method", "ladder", "--latents-per-scale", "0,1,2", "--channels", "8",
                 "--latent-channels", "2", "--rho", "0.8", "--ou-samples", "2", "--steps", "3", "--batch-size", "8",
                 "--eval-every", "3", "--eval-examples", "16", "--log-every", "1", "--checkpoint-every", "3",
                 "--sample-every", "3", "--backend", "torch", "--device", "cpu", "--data-dir", str(SHARED_DATA),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_the_ladder_trains_smoothed_from_the_cli_and_evaluates_unsmoothed(ladder_run, capsys):
    from conftest import SHARED_DATA

    cfg = json.loads((ladder_run / "config.json").read_text())
    assert (cfg["method"], cfg["preset"], cfg["ou"]["rho"]) == ("ladder", "mnist-vdvae-ladder-6", 0.8)
    recs = [json.loads(line) for line in (ladder_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["rho"] for r in train] == [0.8] * 3 and all(math.isfinite(r["loss"]) for r in train)
    assert len(train[-1]["kl_per_layer"]) == 3
    assert main(["eval", str(ladder_run), "--split", "valid", "--iw-samples", "3", "--max-examples", "16",
                 "--data-dir", str(SHARED_DATA), "--no-progress"]) == 0
    res = json.loads((ladder_run / "eval-valid.json").read_text())
    assert res["method"] == "ladder" and res["num_examples"] == 16 and len(res["active_units"]) == 3
    assert math.isfinite(res["elbo"]) and res["iw_bound"] >= res["elbo"] - 1.0
    assert main(["sample", str(ladder_run), "-n", "4", "--output", str(ladder_run / "s.png")]) == 0


def test_gradvar_and_spectrum_read_ladder_checkpoints(ladder_run, tmp_path):
    gv, sp = tmp_path / "gv.json", tmp_path / "sp.json"
    assert main(["gradvar", str(ladder_run), "--rho", "0.5", "--K", "2", "--batches", "1", "--batch-size", "4",
                 "--draws", "4", "--json", str(gv), "--no-progress"]) == 0
    (point,) = json.loads(gv.read_text())["points"]
    assert len(point["per_layer"]) == 2 and point["variance_total"] > 0
    assert main(["spectrum", str(ladder_run), "--points", "4", "--noise", "4", "--degree", "2", "--json", str(sp),
                 "--no-progress"]) == 0
    layers = json.loads(sp.read_text())["checkpoints"][0]["layers"]
    assert len(layers) == 2
    for lay in layers:
        assert min(lay["W"]) >= 0 and all(math.isfinite(v) for v in lay["stability"])
