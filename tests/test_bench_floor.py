"""bench/floor.py and bench/peer.py (issue 20): the floor replays the step's own products, the peer
has the project's shapes, and the bench report prints every step against both."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from floor import Floor, Product, record_products  # noqa: E402
from peer import PeerStep  # noqa: E402

from hvae_fast.config import preset_config  # noqa: E402
from hvae_fast.models.model import OUSmoothing, build_model, count_parameters  # noqa: E402
from hvae_fast.models.objectives import training_loss  # noqa: E402
from hvae_fast.ops.ou import get_backend  # noqa: E402
from hvae_fast.reporting import bench as br  # noqa: E402


def _tiny():
    cfg = preset_config("mnist-mlp-40x4")
    model = build_model("hvae", cfg.model, (1, 28, 28))
    return cfg, model


def test_the_floor_records_every_product_with_the_smoothed_rows():
    cfg, model = _tiny()
    B, K = 6, cfg.ou.samples
    x = (torch.rand(B, 1, 28, 28) < 0.3).float()
    ou = OUSmoothing(0.9, K, get_backend("torch", "cpu"))
    prods = record_products(model, lambda: training_loss(model, x, "hvae", ou, 1.0, 0.0, 1)[0].backward())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(prods) == len(linears)  # each layer runs once per step (the K samples in one batched pass)
    rows = sorted({p.x_shape[0] for p in prods})
    assert rows == [B, K * B]  # the 3 intermediate generators run on K*B rows, the rest on B
    assert sum(p.x_shape[0] == K * B for p in prods) == 3 * 3  # 3 generators x (2 hidden + head)
    first = [p for p in prods if p.x_shape[1] == 784]
    assert len(first) == 1 and not first[0].input_grad  # the data needs no gradient
    assert all(p.input_grad for p in prods if p.x_shape[1] != 784)


def test_the_floor_counts_and_runs_its_flops():
    lin = Product("linear", (10, 20), (30, 20), True)
    conv = Product("conv2d", (2, 3, 8, 8), (4, 3, 3, 3), False, (1, 1), (1, 1))
    f = Floor([lin, conv], "cpu")
    assert f.flops == 3 * 2 * 10 * 20 * 30 + 2 * 2 * (2 * 8 * 8 * 4 * 3 * 9)
    f()  # shapes agree: the replay runs


def test_the_floor_replays_a_transposed_conv_with_the_gradients_autograd_computes():
    m = torch.nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    (prod,) = record_products(m, lambda: m(x))
    assert prod == Product("conv_transpose2d", (2, 6, 8, 8), (6, 5, 4, 4), True, (2, 2), (1, 1))
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    # the replay's two backward products (floor.py) are the true weight and input gradients
    dw = torch.nn.grad.conv2d_weight(dy, m.weight.shape, x.detach(), stride=2, padding=1)
    dx = torch.nn.functional.conv2d(dy, m.weight.detach(), stride=2, padding=1)
    assert torch.allclose(dw, m.weight.grad, atol=1e-4) and torch.allclose(dx, x.grad, atol=1e-5)
    f = Floor([prod], "cpu")
    assert f.flops == 3 * 2 * (2 * 8 * 8 * 6 * 5 * 16)
    f()


def test_the_resnet_floor_records_the_decoders_transposed_conv():
    cfg = preset_config("cifar10-resnet-4")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels=8, blocks=1, data_blocks=1))
    model = build_model("vae", cfg.model, (3, 32, 32))
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 127.5 - 1
    prods = record_products(model, lambda: training_loss(model, x, "vae", None, 1.0, 0.0, 1)[0].backward())
    kinds = [p.kind for p in prods]
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(prods) == len(convs) and kinds.count("conv_transpose2d") == 1


def test_the_peers_logistic_mixture_is_the_projects_in_another_layout():
    """peer.dmol (channel-major) against likelihoods.dmol_logprob (component-major) on the same numbers."""
    from peer import dmol

    from hvae_fast.models.likelihoods import dmol_logprob

    g = torch.Generator().manual_seed(0)
    B, M, H, W = 3, 4, 5, 6
    params = torch.randn(B, 10 * M, H, W, generator=g, dtype=torch.float64)
    x = torch.randint(0, 256, (B, 3, H, W), generator=g).double() / 127.5 - 1
    x[0, :, 0, 0], x[1, :, 0, 0] = -1.0, 1.0  # the edge levels
    logits, rest = params[:, :M], params[:, M:]
    # project: means [M*3] then log-scales [M*3] then coeffs [M*3], each component-major ([M, 3]);
    # peer: 9 channel groups of M ([3, M] per kind)
    peer_rest = rest.view(B, 3, M, 3, H, W).transpose(2, 3).reshape(B, 9 * M, H, W)
    ours = dmol_logprob(params, x, M)
    theirs = dmol(torch.cat([logits, peer_rest], 1), x, M)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-6)


def test_the_resnet_peer_has_the_presets_shapes():
    cfg = preset_config("cifar10-resnet-4")
    model = build_model("hvae", cfg.model, (3, 32, 32))
    x = torch.randint(0, 256, (1, 3, 32, 32)).float() / 127.5 - 1
    peer = PeerStep(cfg, x, True)
    assert count_parameters(peer.model) == count_parameters(model)
    assert torch.isfinite(peer.model.loss(x))


def test_the_peer_has_the_presets_shapes_and_trains():
    cfg, model = _tiny()
    x = (torch.rand(4, 1, 28, 28) < 0.3).float()
    for hvae in (False, True):
        peer = PeerStep(cfg, x, hvae)
        assert count_parameters(peer.model) == count_parameters(model)
        torch.manual_seed(1)  # the same noise for both evaluations
        before = peer.model.loss(peer.x).item()
        for _ in range(20):
            peer.step()
        torch.manual_seed(1)
        after = peer.model.loss(peer.x).item()
        assert after < before - 50  # 20 Adam steps on 4 examples fit them well below the initial bound


def test_the_bench_report_prints_steps_against_floor_and_peers():
    def b(name, s):
        return {"group": "floor-p", "name": name, "stats": {"median": s}, "extra_info": {}}

    data = {"benchmarks": [b("floor-hvae", 0.010), b("peer-hvae", 0.020), b("peer-compiled-hvae", 0.016),
                           b("hvae-fast-hvae-torch", 0.014), b("floor-vae", 0.004), b("peer-vae", 0.010),
                           b("peer-compiled-vae", 0.008), b("hvae-fast-vae", 0.009)]}
    g = br.groups(data)
    table = "\n".join(br.floor_table("floor-p", g["floor-p"]))
    assert "| `hvae-fast-hvae-torch` | 14.00 | 1.40x | 0.70x | 0.88x |" in table
    targets = "\n".join(br.floor_targets(g, gpu=False))
    assert "`hvae-fast-hvae-torch` (p) <= 1.5x its GEMM floor, ahead of the eager and compiled peers: **MET**" in targets
    assert "`hvae-fast-vae` (p) <= 1.5x its GEMM floor" in targets and "**NOT MET** (2.25x floor" in targets


def test_the_bench_csv_carries_each_steps_ratio_to_its_floor_and_peers():
    def b(name, s):
        return {"group": "floor-p", "name": name, "stats": {"median": s, "min": s, "max": s, "rounds": 3},
                "extra_info": {}}

    data = {"benchmarks": [b("floor-hvae", 0.010), b("peer-hvae", 0.020), b("peer-compiled-hvae", 0.016),
                           b("hvae-fast-hvae-cpp", 0.014), b("floor-vae", 0.004)]}
    rows = {r["name"]: r for r in br.records(data)}
    r = rows["hvae-fast-hvae-cpp"]
    assert (r["ratio_to_floor"], r["ratio_to_eager_peer"], r["ratio_to_compiled_peer"]) == (1.4, 0.7, 0.875)
    assert rows["floor-vae"]["ratio_to_floor"] == 1.0 and rows["floor-vae"]["ratio_to_eager_peer"] is None


def test_the_step_profile_splits_each_phase_into_gemm_ou_other_ops_and_overhead():
    from profile_step import PHASES, ProfiledStep, breakdown, table

    r = breakdown(ProfiledStep("mnist-mlp-40x4", "hvae-torch", False, "cpu"), steps=2)
    for p in PHASES:
        d = r[p]
        assert min(d.values()) >= 0
        assert abs(d["gemm"] + d["ou"] + d["other ops"] + d["overhead"] - d["total"]) < 1e-6 * max(1.0, d["total"])
    assert r["forward"]["gemm"] > 0 and r["backward"]["gemm"] > 0  # the model's products land in their phases
    assert r["forward"]["ou"] > 0  # the OU op of the smoothed generators
    assert r["optimizer"]["gemm"] == 0 and r["optimizer"]["other ops"] > 0
    assert r["step_ms_unprofiled"] > 0
    assert "| **step** |" in table({"x": r})
