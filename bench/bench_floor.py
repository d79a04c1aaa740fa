"""A training step against its floor and its peers (issue 20), group ``floor-<preset>``, for
``mnist-mlp-40x4`` (batch 100) and ``cifar10-resnet-4`` (on CPU at bench_train_step's CPU batch, 8).

Names: ``floor-vae`` / ``floor-hvae`` (the step's matrix multiplies alone, bench/floor.py, recorded from
the project's own model at the benchmarked batch), ``peer-vae`` / ``peer-hvae`` (bench/peer.py: a
hand-written eager model of the same shapes, objective and optimizer), ``peer-compiled-*`` (the same
whole step under ``torch.compile``), ``hvae-fast-vae`` and ``hvae-fast-hvae-<backend>`` (the trainer's
step, as in bench_train_step.py). Each row's ``extra_info`` names its floor; the report
(``python -m hvae_fast.reporting.bench``) prints every step's time over its floor and over both peers.
"""

from __future__ import annotations

import pytest
import torch

from bench_train_step import CPU_CIFAR_BATCH, IMAGE_SHAPES, QUICK, Step, _batch, sync
from floor import Floor, record_products
from peer import PeerStep

PRESETS = ["mnist-mlp-40x4", "cifar10-resnet-4"]
VARIANTS = ["floor-vae", "floor-hvae", "peer-vae", "peer-hvae", "peer-compiled-vae", "peer-compiled-hvae",
            "hvae-fast-vae", "hvae-fast-hvae-torch", "hvae-fast-hvae-cpp"]


def _callable(preset: str, variant: str, device):
    hvae = variant.endswith("hvae") or "-hvae-" in variant
    batch = CPU_CIFAR_BATCH if preset.startswith("cifar10") and device.type != "cuda" else None
    if variant.startswith("hvae-fast-"):
        step = Step(preset, "vae" if variant == "hvae-fast-vae" else variant.removeprefix("hvae-fast-"), device, batch)
        return step, step
    ref = Step(preset, "hvae-torch" if hvae else "vae", device, batch)
    if variant.startswith("floor-"):
        products = record_products(ref.model, ref)  # one real step: the shapes its products have
        floor = Floor(products, device)
        return (lambda: (floor(), sync(device))), ref
    x = _batch(ref.cfg, ref.batch, IMAGE_SHAPES[ref.cfg.dataset], device)
    peer = PeerStep(ref.cfg, x, hvae, compiled=variant.startswith("peer-compiled"))
    return (lambda: (peer.step(), sync(device))), ref


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_step_against_floor(benchmark, preset, variant, bench_device):
    if QUICK and preset.startswith("cifar10") and variant.startswith("peer-compiled"):
        pytest.skip("HVAE_BENCH_QUICK=1: compiling the ResNet peer takes minutes; the MLP peer covers the compiled path")
    if variant == "hvae-fast-hvae-cpp":
        from hvae_fast.ops.ou import backend_status

        ok, why = backend_status(bench_device.type)["cpp"]
        if not ok:
            pytest.skip(f"cpp backend unavailable: {why}")
    fn, ref = _callable(preset, variant, bench_device)
    cfg, mnist = ref.cfg, preset.startswith("mnist")
    for _ in range(1 if QUICK or not mnist else 3):  # warm-up (and, for the compiled peer, its compilation)
        fn()
    hvae = variant.endswith("hvae") or "-hvae-" in variant
    benchmark.group = f"floor-{preset}"
    benchmark.name = variant
    benchmark.extra_info.update(preset=preset, variant=variant, floor="floor-hvae" if hvae else "floor-vae",
                                batch=ref.batch, K=cfg.ou.samples if hvae else None,
                                rho=cfg.ou.rho if hvae else None, quick=QUICK)
    benchmark.pedantic(fn, rounds=3 if QUICK else 30 if mnist else 5, iterations=1, warmup_rounds=0)
