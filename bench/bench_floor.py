"""A training step against its floor and its peers (issue 20), group ``floor-<preset>``.

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

from bench_train_step import IMAGE_SHAPES, QUICK, Step, _batch, sync
from floor import Floor, record_products
from peer import PeerStep

PRESET = "mnist-mlp-40x4"
VARIANTS = ["floor-vae", "floor-hvae", "peer-vae", "peer-hvae", "peer-compiled-vae", "peer-compiled-hvae",
            "hvae-fast-vae", "hvae-fast-hvae-torch", "hvae-fast-hvae-cpp"]


def _callable(variant: str, device):
    hvae = variant.endswith("hvae") or "-hvae-" in variant
    if variant.startswith("hvae-fast-"):
        step = Step(PRESET, "vae" if variant == "hvae-fast-vae" else variant.removeprefix("hvae-fast-"), device, None)
        return step, step.cfg
    ref = Step(PRESET, "hvae-torch" if hvae else "vae", device, None)
    if variant.startswith("floor-"):
        products = record_products(ref.model, ref)  # one real step: the shapes its products have
        floor = Floor(products, device)
        return (lambda: (floor(), sync(device))), ref.cfg
    x = _batch(ref.cfg, ref.batch, IMAGE_SHAPES[ref.cfg.dataset], device)
    peer = PeerStep(ref.cfg, x, hvae, compiled=variant.startswith("peer-compiled"))
    return (lambda: (peer.step(), sync(device))), ref.cfg


@pytest.mark.benchmark(group=f"floor-{PRESET}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_against_floor(benchmark, variant, bench_device):
    if variant == "hvae-fast-hvae-cpp":
        from hvae_fast.ops.ou import backend_status

        ok, why = backend_status(bench_device.type)["cpp"]
        if not ok:
            pytest.skip(f"cpp backend unavailable: {why}")
    fn, cfg = _callable(variant, bench_device)
    for _ in range(1 if QUICK else 3):  # warm-up (and, for the compiled peer, its compilation)
        fn()
    hvae = variant.endswith("hvae") or "-hvae-" in variant
    benchmark.name = variant
    benchmark.extra_info.update(preset=PRESET, variant=variant, floor="floor-hvae" if hvae else "floor-vae",
                                batch=cfg.train.batch_size, K=cfg.ou.samples if hvae else None,
                                rho=cfg.ou.rho if hvae else None, quick=QUICK)
    benchmark.pedantic(fn, rounds=3 if QUICK else 30, iterations=1, warmup_rounds=0)
