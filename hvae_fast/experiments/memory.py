"""`hvae-fast memory`: the paper's Table 6, peak memory of one training step per model.
This module measures and returns rows; hvae_fast.reporting.memory_table prints and writes them.

Default setting (each a flag): CIFAR-10 shapes (3x32x32, discretized logistic likelihood), batch 64,
5 OU or IWAE samples; VAE, IWAE and HVAE at 4 and 6 stochastic layers (the cifar10-resnet-4
preset's nets, 100 maps, 6 blocks per net, with the depth set), LVAE and BIVA at 15 (the
cifar10-lvae-15 / cifar10-biva-15 presets). Inputs are synthetic (uniform random 8-bit images), so
no dataset is needed; memory does not depend on the pixel values.

What is measured: one full training step (forward, backward, optimizer step with the preset's
optimizer, Adamax for CIFAR-10) after one warm-up step, so the optimizer state exists.
  vae   HierarchicalVAE, training_loss(method="vae")
  iwae  HierarchicalVAE, training_loss(method="iwae", iw_k=samples)
  hvae  HierarchicalVAE with OUSmoothing(rho=0.9, samples, backend=get_backend(--backend, device))
  lvae / biva  their models (hvae_fast.models.baselines), ELBO, unsmoothed (the paper's baselines)
  lvae-ou / biva-ou  the same ladders with OU-smoothed generator layers (rho, samples, backend as hvae)
  ladder / ladder-ou  the VDVAE-style top-down ladder (cifar10-vdvae-ladder-6, 6 latents at its own
        depth, which --baseline-depths does not change), unsmoothed / OU-smoothed

The memory figure:
  CUDA  torch.cuda.max_memory_allocated() over the measured step, after reset_peak_memory_stats()
        (what the caching allocator handed to tensors; the paper's number is of this kind).
  CPU   an allocator-independent count, in bytes:
            saved   tensors autograd saves for backward in the forward pass, counted with
                    torch.autograd.graph.saved_tensors_hooks, each storage once (deduplicated by
                    its data_ptr; storages of parameters are left out, they are counted below)
          + params + grads + optimizer state (every tensor in optimizer.state)
        i.e. the memory that must be live at the start of backward plus the persistent training
        state. Temporaries of the forward that autograd does not keep, and the transient buffers
        of backward (the activations --recompute rebuilds, say), are not in it.
        Next to it, the true peak (column ``cpu_peak_bytes``): every allocation and free of torch's
        CPU allocator during the step, read from torch.profiler (profile_memory=True); the peak of
        their running sum plus what is live at the step's start (parameters, buffers, optimizer
        state, the input batch) is the step's peak. Memory taken outside torch's allocator
        (oneDNN scratch space, thread stacks) is not in it. And the process peak RSS
        (resource.getrusage ru_maxrss), monotone over the process, so for every model after the
        first it is "the peak so far", not a per-model figure. On CPU ``step_seconds`` includes
        the profiler's overhead.
  On CUDA the count above is reported too (column ``counted_bytes``), so the two can be compared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import tempfile
import time

import torch

from ..errors import HVAEError
from ..reporting.memory_table import PAPER

log = logging.getLogger("hvae_fast.experiments.memory")

MODELS = ("vae", "iwae", "hvae", "lvae", "biva", "lvae-ou", "biva-ou", "ladder", "ladder-ou")
LADDERS = ("lvae", "biva", "ladder")  # measured at --baseline-depths (the VDVAE-style one at its preset's depth)
IMAGE_SHAPE = (3, 32, 32)


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class SavedTensorCounter:
    """Context manager: bytes of the distinct storages autograd saves for backward inside it.

    Storages in ``exclude`` (data_ptrs, e.g. the parameters') are not counted.
    """

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen[ptr] = _nbytes(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _storages_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen.setdefault(t.untyped_storage().data_ptr(), _nbytes(t))
    return sum(seen.values())


PROFILER_CHATTER = "USDT:"  # lines the profiler (kineto) prints from C++ on some builds as it starts and stops


@contextlib.contextmanager
def without_profiler_chatter():
    """Run the body with file descriptors 1 and 2 sent to temporary files, then write what they got
    back to sys.stdout / sys.stderr, less the lines that start with PROFILER_CHATTER.

    The profiler prints those lines from native code, past Python's sys.stdout, so only a redirect of
    the descriptors keeps them out of the command's output."""
    import ctypes

    libc = ctypes.CDLL(None)
    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.flush()
    captured, saved = [], []
    try:
        for fd in (1, 2):
            captured.append(tempfile.TemporaryFile())
            saved.append(os.dup(fd))
            os.dup2(captured[-1].fileno(), fd)
        yield
    finally:
        for stream in streams:
            stream.flush()
        libc.fflush(None)  # C stdio buffers (printf), still to reach the temporary files
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        for tmp, stream in zip(captured, streams):
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            tmp.close()
            kept = "".join(ln for ln in lines if not ln.lstrip().startswith(PROFILER_CHATTER))
            if kept:
                stream.write(kept)
                stream.flush()


def cpu_peak(fn):
    """Run ``fn()`` and return ``(fn's result, peak, net)``: the peak of the running sum of the bytes
    torch's CPU allocator hands out and takes back inside ``fn`` (0 if it only frees), and that sum at
    the end. Memory live before the call is not in it. The profiler's USDT lines are dropped from
    the output (``without_profiler_chatter``)."""
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    peak = run = 0
    for _, _, n in events:
        run += n
        peak = max(peak, run)
    return out, peak, run


def step_memory(model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, device, inputs=()) -> dict:
    """Memory of one training step ``loss_fn(model).backward(); optimizer.step()``, after a warm-up step.

    Returns bytes: ``saved``, ``params``, ``grads``, ``optimizer``, ``counted`` (their sum, the CPU
    count), ``cpu_peak`` (CPU only, else None: the allocator's peak over the step plus the bytes live at
    its start, parameters, buffers, optimizer state and the tensors ``inputs``), ``cuda_peak`` (CUDA
    only, else None), ``rss_peak`` (process, monotone), and ``seconds``.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"

    def step(counter=None):
        optimizer.zero_grad(set_to_none=True)
        if counter is None:
            loss = loss_fn(model)
        else:
            with counter:
                loss = loss_fn(model)
        loss.backward()
        optimizer.step()

    step()  # warm-up: creates the optimizer state, compiles / autotunes kernels
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    params = list(model.parameters())
    counter = SavedTensorCounter(exclude={p.untyped_storage().data_ptr() for p in params})
    state = [v for s in optimizer.state.values() for v in s.values()]
    live = _storages_bytes([*params, *model.buffers(), *state, *inputs])  # grads are None here
    t0 = time.perf_counter()
    if cuda:
        step(counter)
        torch.cuda.synchronize(device)
        rise = None
    else:
        _, rise, _ = cpu_peak(lambda: step(counter))
    seconds = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    state = [v for s in optimizer.state.values() for v in s.values()]
    out = {"saved": counter.bytes, "params": _storages_bytes(params),
           "grads": _storages_bytes(p.grad for p in params if p.grad is not None),
           "optimizer": _storages_bytes(state), "cuda_peak": cuda_peak,
           "cpu_peak": None if rise is None else live + rise,
           "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
           "seconds": seconds}
    out["counted"] = out["saved"] + out["params"] + out["grads"] + out["optimizer"]
    return out


def model_config(model: str, layers: int, channels: int | None = None, blocks: int | None = None,
                 data_blocks: int | None = None):
    """The RunConfig measured for ``model`` at ``layers`` stochastic layers (with optional shrinking)."""
    from ..config import preset_config

    method = model.removesuffix("-ou")
    name = {"lvae": "cifar10-lvae-15", "biva": "cifar10-biva-15", "ladder": "cifar10-vdvae-ladder-6"}.get(
        method, "cifar10-resnet-4")
    cfg = preset_config(name)
    cfg.method = method
    m = cfg.model
    if method != "ladder":  # the VDVAE-style ladder's depth is its latents_per_scale
        m.num_layers = layers
    if channels is not None:
        m.channels = channels
    if blocks is not None:
        m.blocks = blocks
        m.data_blocks = blocks
    if data_blocks is not None:
        m.data_blocks = data_blocks
    return cfg


def measure(model: str, layers: int, batch_size: int = 64, samples: int = 5, device="cpu", backend: str = "auto",
            channels: int | None = None, blocks: int | None = None, data_blocks: int | None = None,
            rho: float = 0.9, seed: int = 0, recompute: bool = False) -> dict:
    """One row of the table: the memory of one training step of ``model`` (see the module docstring)."""
    from ..models.model import count_parameters
    from ..models.objectives import training_loss
    from ..training.build import build_training

    if model not in MODELS:
        raise HVAEError(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    if batch_size < 1 or samples < 1 or (layers < 1 and not model.startswith("ladder")):
        raise HVAEError("--batch-size, --samples and the depths must be >= 1")
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = model_config(model, layers, channels, blocks, data_blocks)
    # hvae is smoothed at every rho; a ladder only as its "-ou" row (rho = 1 trains the plain baseline)
    smoothed = model == "hvae" or model.endswith("-ou")
    cfg.ou.rho, cfg.ou.samples, cfg.ou.backend, cfg.ou.recompute = rho if smoothed else 1.0, samples, backend, recompute
    if model.endswith("-ou") and rho >= 1.0:
        raise HVAEError(f"{model}: a ladder is smoothed only at rho < 1: pass --rho below 1")
    tr = build_training(cfg, device, IMAGE_SHAPE)
    net, opt, ou = tr.model, tr.opt, tr.ou
    net.train()
    n_params = count_parameters(net)
    backend_name = tr.backend or "-"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randint(0, 256, (batch_size, *IMAGE_SHAPE), generator=gen).float() / 127.5 - 1.0).to(device)

    def loss_fn(m):
        return training_loss(m, x, cfg.method, ou, beta=1.0, free_bits=0.0, iw_k=samples)[0]

    r = step_memory(net, loss_fn, opt, device, inputs=(x,))
    cuda = device.type == "cuda"
    paper = PAPER.get((model, layers), (None, None))
    row = {"model": model, "layers": net.depth, "parameters": n_params,
           "memory_bytes": r["cuda_peak"] if cuda else r["counted"],
           "memory_kind": "cuda max_memory_allocated" if cuda else "cpu saved+params+grads+optimizer",
           "ratio_to_vae": None, "saved_bytes": r["saved"], "param_bytes": r["params"], "grad_bytes": r["grads"],
           "optimizer_bytes": r["optimizer"], "counted_bytes": r["counted"], "cpu_peak_bytes": r["cpu_peak"],
           "cpu_peak_ratio_to_vae": None, "rss_peak_bytes": r["rss_peak"], "ratio_to_unsmoothed": None,
           "step_seconds": round(r["seconds"], 4), "paper_memory_gb": paper[0], "paper_parameters": paper[1],
           "batch_size": batch_size, "samples": samples, "backend": backend_name, "recompute": recompute,
           "device": str(device)}
    del net, opt, x, tr
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_table(models=("vae", "iwae", "hvae", "lvae", "biva"), depths=(4, 6), baseline_depths=(15,), **kw) -> list:
    """Rows for every model and depth (vae/iwae/hvae at ``depths``, the ladders at ``baseline_depths``;
    the VDVAE-style ladder once, at its own depth), with ``ratio_to_vae`` filled where the VAE of the
    same depth was measured and ``ratio_to_unsmoothed`` where a "-ou" row's plain ladder was."""
    rows = []
    for m in models:
        method = m.removesuffix("-ou")
        for d in ((0,) if method == "ladder" else baseline_depths if method in LADDERS else depths):
            log.info("measuring %s", m if method == "ladder" else f"{m} with {d} stochastic layers")
            rows.append(measure(m, d, **kw))
    vae = {r["layers"]: r for r in rows if r["model"] == "vae"}
    unsmoothed = {(r["model"], r["layers"]): r for r in rows if r["model"] in LADDERS}
    for r in rows:
        r["ratio_to_unsmoothed"] = None
        u = unsmoothed.get((r["model"].removesuffix("-ou"), r["layers"])) if r["model"].endswith("-ou") else None
        if u is not None:
            r["ratio_to_unsmoothed"] = round(r["memory_bytes"] / u["memory_bytes"], 3)
        v = vae.get(r["layers"])
        if v is not None:
            r["ratio_to_vae"] = round(r["memory_bytes"] / v["memory_bytes"], 3)
            if r["cpu_peak_bytes"] is not None:
                r["cpu_peak_ratio_to_vae"] = round(r["cpu_peak_bytes"] / v["cpu_peak_bytes"], 3)
    return rows
