"""--precision bf16 / fp16: the nets under torch.autocast, the densities in float32, fp16's GradScaler."""

import pytest
import torch

from hvae_fast.config import ModelConfig, OUConfig, RunConfig, TrainConfig
from hvae_fast.distributions import gaussian_logprob
from hvae_fast.models.likelihoods import bernoulli_logprob
from hvae_fast.models.model import OUSmoothing, build_model
from hvae_fast.ops.ou import get_backend
from hvae_fast.training.trainer import Trainer

from test_trainer_cli import records, train_interrupted


def config(precision, steps=60, hidden=(128, 64), **train):
    t = dict(steps=steps, batch_size=64, lr=2e-3, log_every=10, eval_every=steps, eval_examples=64,
             checkpoint_every=10, sample_every=steps, seed=5, precision=precision)
    t.update(train)
    return RunConfig(dataset="binarized-mnist", preset="tiny", method="hvae",
                     model=ModelConfig(arch="mlp", latent_sizes=(16, 8), hidden_sizes=hidden),
                     ou=OUConfig(rho=0.8, samples=3, backend="torch"), train=TrainConfig(**t), device="cpu")


def test_bf16_training_follows_the_fp32_loss_curve(shared_data, tmp_path):
    # Same seed, data and noise; only the nets' arithmetic differs. Tolerance: every logged loss
    # within 1% of fp32's (bf16 rounds each matmul input to 8 mantissa bits, ~0.4%; the gap grows
    # as the weights drift apart), and the curve really falls (over 30 nats after step 10).
    runs = {}
    for p in ("fp32", "bf16"):
        Trainer(config(p), tmp_path / p, data_dir=shared_data, progress=False).fit()
        runs[p] = [r["loss"] for r in records(tmp_path / p)]
    f32, b16 = runs["fp32"], runs["bf16"]
    assert len(f32) == len(b16) == 6
    assert f32[0] - f32[-1] > 30
    rel = [abs(a - b) / abs(a) for a, b in zip(f32, b16)]
    assert max(rel) < 0.01, rel
    assert f32 != b16  # bf16 really ran: identical curves would mean autocast never engaged


def _capture(model, x, precision):
    """Terms of one training forward under autocast, with every generator/decoder net output kept."""
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: outs.__setitem__(name, o[0]))
             for name, m in (("px", model.px), ("gen0", model.gen[0]))]
    ou = OUSmoothing(rho=0.8, samples=3, backend=get_backend("torch", "cpu"))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=precision):
        terms = model(x, ou)
    for h in hooks:
        h.remove()
    return terms, outs


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_likelihood_and_kl_stay_float32_under_autocast(precision):
    torch.manual_seed(1)
    model = build_model("hvae", ModelConfig(arch="mlp", latent_sizes=(16, 8), hidden_sizes=(128, 64)), (1, 28, 28))
    x = (torch.rand(32, 1, 28, 28) < 0.3).float()
    terms, outs = _capture(model, x, precision)
    assert outs["px"].dtype == precision  # the nets did run in low precision
    for t in [terms.log_px, *terms.log_q, *terms.log_p]:
        assert t.dtype == torch.float32
    # log p(x|z_1) from the decoder's low-precision logits, evaluated in float64: the model's value
    # must match to float32 accuracy; the same density computed in the low precision misses by far.
    ref = bernoulli_logprob(outs["px"].double(), x.double())
    assert torch.allclose(terms.log_px.double(), ref, rtol=1e-5, atol=1e-3)
    low = bernoulli_logprob(outs["px"], x.to(precision))
    assert (low.double() - ref).abs().max() > 1e-2  # the control: this test can fail
    # The smoothed generator layer p(z_1|z_2): the head averages the K low-precision outputs in float32.
    K, B = 3, x.shape[0]
    mean_raw, scale_raw = outs["gen0"].double().view(K, B, -1).chunk(2, dim=2)
    sigma = torch.nn.functional.softplus(scale_raw) + model.cfg.min_scale
    # The posterior sample z_1 it scored: the encoder re-run on the same RNG stream (forward draws
    # the z's before the OU seeds).
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=precision):
        zs, mus, sigmas, _ = model.encode(x)
    ref_p = gaussian_logprob(zs[0].double(), mean_raw.mean(0), sigma.mean(0))
    assert torch.allclose(terms.log_p[0].double(), ref_p, rtol=1e-5, atol=1e-3)


def test_fp16_uses_a_grad_scaler_that_checkpoints_and_resumes_exactly(shared_data, tmp_path, monkeypatch):
    cfg = config("fp16", steps=20, hidden=(32, 16), batch_size=32)
    full = Trainer(cfg, tmp_path / "full", data_dir=shared_data, progress=False)
    full.fit()
    rec = records(tmp_path / "full")
    assert all(r["grad_scale"] > 0 for r in rec)  # logged at every record
    assert torch.load(tmp_path / "full" / "checkpoint-latest.pt", weights_only=True)["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(p).all() for p in full.model.parameters())

    train_interrupted(monkeypatch, cfg, tmp_path / "part", shared_data)
    resumed = Trainer(cfg, tmp_path / "part", data_dir=shared_data, resume=True, progress=False)
    saved = torch.load(tmp_path / "part" / "checkpoint-latest.pt", weights_only=True)["grad_scaler"]
    assert resumed.step == 10 and resumed.scaler.get_scale() == saved["scale"]
    resumed.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_fp32_and_bf16_records_carry_no_grad_scale(shared_data, tmp_path):
    Trainer(config("bf16", steps=10, hidden=(32, 16), batch_size=32), tmp_path / "r", data_dir=shared_data, progress=False).fit()
    assert all("grad_scale" not in r for r in records(tmp_path / "r"))
    assert not torch.load(tmp_path / "r" / "checkpoint-latest.pt", weights_only=True)["grad_scaler"]
