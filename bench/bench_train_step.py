"""Step-level benchmarks: one full training step (forward, backward, clip, optimizer step).

Benchmark names: ``vae`` (the plain stacked VAE: the baseline), ``hvae-torch`` (OU-smoothed
generator layers on the eager torch backend), ``hvae-<backend>`` for each available fused backend
(``hvae-triton``, ``hvae-cuda``, ``hvae-cpp``; the rest are skipped with the probe's reason), and
``hvae-torch-recompute`` (the K-sample generator activations rebuilt in backward, ``--ou-recompute``),
and ``hvae-auto`` (``--backend auto``: per op and shape class the backend measured fastest, decided
in an untimed step before the memory step and listed in ``extra_info["auto"]``).
Groups: ``step-<preset>``. Every variant is set up by the trainer's ``build_training`` (model,
optimizer, OU smoothing) from the same weights (seed 0), gets the same synthetic batch, and runs the
step the trainer runs (trainer.Trainer.train_step: loss, zero_grad, backward, clip_grad_norm_,
finiteness checks, optimizer step) with the preset's optimizer at its step-0 learning rate.

Memory (``extra_info``, measured on one untimed step: on CUDA after a warm-up step, so optimizer state exists;
on CPU it is the first step, and grads and optimizer state are counted explicitly):
  CUDA: ``peak_mem_bytes`` = torch.cuda.max_memory_allocated over the step.
  CPU:  ``peak_mem_bytes`` = bytes of the tensors saved for backward (saved_tensors_hooks, deduplicated
        by storage, parameters excluded) + parameters + gradients + optimizer state: the tensors that
        are alive together at the end of the forward pass. ``peak_rss_bytes`` is the process's peak
        RSS during that step (VmHWM after resetting it through /proc/self/clear_refs) and
        ``rss_delta_bytes`` its rise over the RSS before the step.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from hvae_fast.config import preset_config
from hvae_fast.models.objectives import training_loss
from hvae_fast.training.build import build_training, clip_gradients

IMAGE_SHAPES = {"binarized-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
QUICK = os.environ.get("HVAE_BENCH_QUICK", "").strip() == "1"  # CI: does every benchmark run (bench/conftest.py)
CPU_CIFAR_BATCH = int(os.environ.get("HVAE_BENCH_CIFAR_CPU_BATCH", "2" if QUICK else "8"))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg, B, shape, device):
    g = torch.Generator().manual_seed(0)
    if cfg.model.likelihood == "bernoulli":
        x = (torch.rand((B, *shape), generator=g) < 0.3).float()
    else:  # 8-bit images on the 256 levels of [-1, 1]
        x = torch.randint(0, 256, (B, *shape), generator=g).float() / 127.5 - 1.0
    return x.to(device)


class Step:
    """The model, optimizer and batch of one variant, and its training step."""

    def __init__(self, preset: str, variant: str, device, batch: int | None):
        cfg = preset_config(preset)
        if QUICK and cfg.model.arch == "resnet":  # the preset's layers, 8 channels, one block per net
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels=8, blocks=1, data_blocks=1))
        self.method = "vae" if variant == "vae" else "hvae"
        name = variant.removeprefix("hvae-")
        cfg = dataclasses.replace(cfg, method=self.method, ou=dataclasses.replace(
            cfg.ou, backend=name.removesuffix("-recompute"), recompute=name.endswith("-recompute")))
        self.cfg = cfg
        shape = IMAGE_SHAPES[cfg.dataset]
        torch.manual_seed(0)
        tr = build_training(cfg, device, shape)  # the trainer's set-up; its LR schedule is not stepped here
        self.model, self.opt, self.ou = tr.model, tr.opt, tr.ou
        t = cfg.train
        self.grad_clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        self.batch = batch or t.batch_size
        self.x = _batch(cfg, self.batch, shape, device)
        self.device = device

    def forward(self):
        return training_loss(self.model, self.x, self.method, self.ou, 1.0, 0.0, 1)[0]

    def finish(self, loss):
        self.opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            gn = clip_gradients(self.model, self.grad_clip)
            finite = bool(torch.isfinite(gn))
        if finite:
            self.opt.step()
        return finite

    def __call__(self):
        ok = self.finish(self.forward())
        sync(self.device)
        return ok


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def _proc_status(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(step: Step) -> dict:
    dev = step.device
    params = list(step.model.parameters())
    if dev.type == "cuda":
        sync(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated(dev), "mem_before_step_bytes": before,
                "mem_method": "torch.cuda.max_memory_allocated over one step (after a warm-up step)"}

    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs and ptr not in saved:
                saved[ptr] = st.nbytes()
        except Exception:  # tensors without a plain storage: not counted
            pass
        return t

    rss_before = _proc_status("VmRSS")
    reset = _reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step.forward()
    step.finish(loss)
    del loss
    peak_rss = _proc_status("VmHWM") if reset else None
    saved_bytes = sum(saved.values())
    p_bytes = _tensor_bytes(params)
    g_bytes = _tensor_bytes(p.grad for p in params)
    o_bytes = sum(_tensor_bytes(s.values()) for s in step.opt.state.values())
    return {
        "peak_mem_bytes": saved_bytes + p_bytes + g_bytes + o_bytes,
        "saved_for_backward_bytes": saved_bytes,
        "param_bytes": p_bytes, "grad_bytes": g_bytes, "optimizer_state_bytes": o_bytes,
        "peak_rss_bytes": peak_rss,
        "rss_delta_bytes": (peak_rss - rss_before) if (peak_rss and rss_before) else None,
        "mem_method": "saved-for-backward (saved_tensors_hooks, dedup by storage) + params + grads + optimizer state",
    }


# ---------------------------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------------------------

def _bench_step(benchmark, preset, variant, device, scale):
    is_cuda = device.type == "cuda"
    batch, note = None, None
    if preset.startswith("cifar10") and not is_cuda:
        batch = CPU_CIFAR_BATCH
        note = f"CPU run: batch {batch} instead of the preset's 64 (a 64-example step takes minutes on 2 cores)"
    step = Step(preset, variant, device, batch)
    auto = {}
    if variant == "hvae-auto":  # decide (time the candidates) outside the memory and timed steps
        from hvae_fast.ops import autotune

        step()
        auto = {k: r["choice"] for k, r in autotune.cached_decisions(device)[2].items()}

    t0 = time.perf_counter()
    if is_cuda:
        step()  # warm-up: lazy init, optimizer state, native extension build, autotuning
        warm = time.perf_counter() - t0
        mem = measure_memory(step)  # a second, untimed step: the peak includes the optimizer state
    else:
        # CPU: the memory step is the warm-up (it counts grads and optimizer state explicitly, so it
        # needs no earlier step); saves one slow CIFAR step per variant.
        mem = measure_memory(step)
        warm = time.perf_counter() - t0

    if is_cuda:
        rounds = 50 if preset.startswith("mnist") else 10
    else:
        rounds = 20 if preset.startswith("mnist") else 2
    rounds = 2 if QUICK else max(1, int(round(rounds * scale)))
    if not is_cuda and warm > 20 and rounds > 1:  # keep a heavily loaded CPU run bounded
        rounds = max(1, rounds // 2)

    cfg = step.cfg
    benchmark.name = variant
    benchmark.extra_info.update(
        preset=preset, variant=variant, method=step.method,
        backend=variant.removeprefix("hvae-").removesuffix("-recompute") if step.method == "hvae" else None,
        recompute=variant.endswith("-recompute"),
        batch=step.batch, preset_batch=cfg.train.batch_size, batch_note=note, quick=QUICK,
        K=cfg.ou.samples if step.method == "hvae" else None, rho=cfg.ou.rho if step.method == "hvae" else None,
        optimizer=cfg.train.optimizer, params=sum(p.numel() for p in step.model.parameters()),
        data="synthetic batch", rounds=rounds, first_step_s=warm, auto=auto or None, **mem)
    # The memory step already warmed up again; MNIST steps are cheap enough for one more.
    warmup = 1 if (is_cuda or preset.startswith("mnist")) and not QUICK else 0
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)


@pytest.mark.benchmark(group="step-mnist-mlp-40x4")
def test_step_mnist_mlp(benchmark, step_variant, bench_device, bench_scale):
    _bench_step(benchmark, "mnist-mlp-40x4", step_variant, bench_device, bench_scale)


@pytest.mark.benchmark(group="step-cifar10-resnet-4")
def test_step_cifar10_resnet4(benchmark, step_variant, bench_device, bench_scale):
    _bench_step(benchmark, "cifar10-resnet-4", step_variant, bench_device, bench_scale)
