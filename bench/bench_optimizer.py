"""The optimizer step and the gradient clip of a preset, per implementation (issue 20), group
``optimizer-<preset>``.

Names: ``adam-single`` (torch's per-tensor loop, its default on CPU), ``adam-foreach``, ``adam-fused``
(what the trainer uses, hvae_fast/training/build.py:make_optimizer), ``clip-single`` and ``clip-foreach``
(``clip_grad_norm_``; the trainer's clip_gradients is foreach). All on the preset's own parameters
with gradients from one real step; the report prints each row's time over ``adam-single``.
"""

from __future__ import annotations

import pytest
import torch

from bench_train_step import QUICK, Step, sync

PRESET = "mnist-mlp-40x4"
VARIANTS = ["adam-single", "adam-foreach", "adam-fused", "clip-single", "clip-foreach"]


@pytest.mark.benchmark(group=f"optimizer-{PRESET}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_optimizer_step(benchmark, variant, bench_device):
    step = Step(PRESET, "hvae-torch", bench_device, None)
    step()  # real gradients (and a first update) on the preset's parameters
    params = [p for p in step.model.parameters() if p.grad is not None]
    kind, impl = variant.split("-")
    if kind == "adam":
        flags = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
        opt = torch.optim.Adam(params, lr=step.cfg.train.lr, **flags)

        def fn():
            opt.step()
            sync(bench_device)
    else:
        def fn():
            torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=impl == "foreach")
            sync(bench_device)
    fn()
    benchmark.name = variant
    benchmark.extra_info.update(preset=PRESET, variant=variant, tensors=len(params),
                                elements=sum(p.numel() for p in params), quick=QUICK)
    benchmark.pedantic(fn, rounds=5 if QUICK else 200, iterations=1, warmup_rounds=0 if QUICK else 10)
