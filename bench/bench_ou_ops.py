"""Op-level benchmarks of the two OU ops: every implementation against eager PyTorch.

Implementations (benchmark names): ``torch`` (the eager reference backend, the group's baseline),
``torch-compile`` (torch.compile of the reference; its noise comes from torch.randn inside the
compiled graph so inductor can fuse it), and each fused backend (``triton``, ``cuda``, ``cpp``)
that ``backend_status`` reports available, and ``auto`` (``--backend auto``: the backend measured
fastest for the shape class, hvae_fast/ops/autotune.py). The head's mean_raw and scale_raw are what the
model passes: the two channel halves of one [K, B, 2C, ...] tensor (non-contiguous views). Modes: ``fwd`` (training forward, inputs requiring
grad), ``bwd`` (autograd.grad of a forward done untimed in the round's setup), ``fwdbwd``.
Group names: ``op-<op>-<mode>-<size>``.

``extra_info["bytes"]`` is the compulsory fp32 traffic at the op's autograd boundary (each input
read once, each output written once; the noise is generated in-kernel, never read):
  correlated_samples  fwd: read z, mu, sigma (3N), write K N        bwd: read grad K N, write 3 grads (3N)
  gaussian_head       fwd: read mean_raw, scale_raw (2 K N), target N, write B
                      bwd: read grad B and the three inputs again ((2K+1) N), write their grads ((2K+1) N)
with N = B x prod(S) elements per sample; fwdbwd is the sum. On CUDA ``kernel_time_s`` is the GPU
time per call from CUDA events around 50 back-to-back calls (``cuda_event_time``; the benchmark's
own median times the Python call with a sync, ``call_time_s``), ``bandwidth_Bps`` = bytes /
kernel_time_s, and ``bandwidth_frac`` relates it to the GPU's reference bandwidth.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from hvae_fast.ops.ou import correlated_samples_reference, gaussian_head_reference, get_backend


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

RHO, MIN_SCALE, MODE, SEED = 0.9, 1e-3, "mean-std", 1234

# name: (B, K, per-example shape S). MNIST MLP latents; CIFAR-10 conv latents 8x16x16;
# the 100-channel 16x16 feature size of the CIFAR-10 ResNet (gaussian head; correlated_samples on GPU only).
SIZES = {
    "mnist-mlp": (100, 5, (40,)),
    "cifar10-latent": (64, 5, (8, 16, 16)),
    "cifar10-feat100": (64, 5, (100, 16, 16)),
}
QUICK = os.environ.get("HVAE_BENCH_QUICK", "").strip() == "1"  # CI: does every benchmark run (bench/conftest.py)
if QUICK:
    SIZES = {"quick-mlp": (8, 2, (16,)), "quick-conv": (2, 2, (3, 5, 5))}
LARGE = {"cifar10-feat100"}  # the sizes the GPU bandwidth target is judged on
MODES = ("fwd", "bwd", "fwdbwd")


# ---------------------------------------------------------------------------------------------
# The implementations of each op, as fn(*inputs) -> output
# ---------------------------------------------------------------------------------------------

_COMPILED: dict = {}


def _compiled(op: str, size: str, K: int):
    """One statically-shaped compiled reference per (op, size); reused across modes."""
    key = (op, size)
    if key not in _COMPILED:
        if op == "correlated_samples":
            def ref(z, mu, sigma):
                eps = torch.randn((K, *z.shape), device=z.device, dtype=z.dtype)
                return correlated_samples_reference(z, mu, sigma, RHO, eps)
        else:
            def ref(mean_raw, scale_raw, target):
                return gaussian_head_reference(mean_raw, scale_raw, target, MODE, MIN_SCALE)
        _COMPILED[key] = torch.compile(ref, dynamic=False)
    return _COMPILED[key]


def _impl(op: str, impl: str, size: str, K: int, device):
    if impl == "torch-compile":
        return _compiled(op, size, K)
    backend = get_backend(impl, device)
    if op == "correlated_samples":
        return lambda z, mu, sigma: backend.correlated_samples(z, mu, sigma, RHO, K, SEED)
    return lambda mean_raw, scale_raw, target: backend.gaussian_head_logprob(mean_raw, scale_raw, target, MODE, MIN_SCALE)


def _inputs(op: str, size: str, device):
    B, K, S = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=g)).to(device).requires_grad_(True)

    if op == "correlated_samples":
        z, mu = t(B, *S), t(B, *S)
        sigma = (0.1 + torch.rand((B, *S), generator=g)).to(device).requires_grad_(True)
        return (z, mu, sigma), (K, B, *S)
    mean_raw, scale_raw = torch.cat([t(K, B, *S), t(K, B, *S, scale=0.5)], dim=2).detach().chunk(2, dim=2)
    return (mean_raw.requires_grad_(True), scale_raw.requires_grad_(True), t(B, *S)), (B,)


def op_bytes(op: str, mode: str, size: str, itemsize: int = 4) -> int:
    B, K, S = SIZES[size]
    N = B * math.prod(S)
    if op == "correlated_samples":
        fwd, bwd = (3 + K) * N, (K + 3) * N
    else:
        fwd, bwd = (2 * K + 1) * N + B, B + 2 * (2 * K + 1) * N
    return itemsize * {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def _rounds(one_call_s: float, device, scale: float) -> int:
    """Rounds so that a benchmark takes about its time budget: 0.4 s on CPU, 0.25 s on GPU (quick: 3)."""
    if QUICK:
        return 3
    budget = (0.25 if device.type == "cuda" else 0.4) * scale
    return int(min(200, max(5, budget / max(one_call_s, 1e-6))))


def _bench_op(benchmark, op, impl, mode, size, device, gpu_bandwidth, scale):
    B, K, S = SIZES[size]
    if op == "correlated_samples" and size == "cifar10-feat100" and device.type != "cuda":
        pytest.skip("correlated_samples at the 100-channel feature size is a GPU-only size (keeps the CPU suite short)")
    fn = _impl(op, impl, size, K, device)
    inputs, out_shape = _inputs(op, size, device)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device)

    if mode == "fwd":
        def timed():
            out = fn(*inputs)
            sync(device)
            return out
        setup = None
    elif mode == "fwdbwd":
        def timed():
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, grad_out)
            sync(device)
            return grads
        setup = None
    else:  # bwd: the forward runs (and finishes) in the untimed setup of each round
        def setup():
            out = fn(*inputs)
            sync(device)
            return (out,), {}

        def timed(out):
            grads = torch.autograd.grad(out, inputs, grad_out)
            sync(device)
            return grads

    # Warm up (compiles torch.compile / the native extension; cudnn, allocator) and size the rounds.
    def once():
        args, kw = setup() if setup else ((), {})
        t0 = time.perf_counter()
        timed(*args, **kw)
        return time.perf_counter() - t0

    once()
    rounds = _rounds(min(once(), once()), device, scale)

    benchmark.group = f"op-{op}-{mode}-{size}"
    benchmark.name = impl
    nbytes = op_bytes(op, mode, size)
    benchmark.extra_info.update(op=op, impl=impl, mode=mode, size=size, B=B, K=K, S=list(S), rho=RHO,
                                head_mode=MODE if op == "gaussian_head" else None, dtype="float32",
                                bytes=nbytes, large=size in LARGE, rounds=rounds)
    if setup is None:
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1)
    if device.type == "cuda" and benchmark.stats is not None:
        # The kernels' time, not the Python call's: CUDA events around back-to-back calls (no sync
        # between them), so the host time of a call hides behind the queued kernels.
        kernel_s = cuda_event_time(fn, inputs, grad_out, mode)
        bw = nbytes / kernel_s
        benchmark.extra_info.update(kernel_time_s=kernel_s, bandwidth_Bps=bw,
                                    call_time_s=benchmark.stats.stats.median)
        if gpu_bandwidth:
            benchmark.extra_info.update(bandwidth_frac=bw / gpu_bandwidth["reference_Bps"],
                                        bandwidth_reference=gpu_bandwidth["reference"],
                                        bandwidth_reference_Bps=gpu_bandwidth["reference_Bps"])


def cuda_event_time(fn, inputs, grad_out, mode: str, calls: int = 50, repeats: int = 5) -> float:
    """Seconds per op call on the GPU: the median over ``repeats`` of CUDA-event time around ``calls``
    back-to-back calls (fwd: forward; bwd: autograd.grad of one forward, graph retained; fwdbwd:
    both), divided by ``calls``."""
    out = fn(*inputs) if mode == "bwd" else None

    def once():
        if mode == "fwd":
            fn(*inputs)
        elif mode == "bwd":
            torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        else:
            torch.autograd.grad(fn(*inputs), inputs, grad_out)

    once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
def test_correlated_samples(benchmark, op_impl, mode, size, bench_device, gpu_bandwidth, bench_scale):
    _bench_op(benchmark, "correlated_samples", op_impl, mode, size, bench_device, gpu_bandwidth, bench_scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
def test_gaussian_head(benchmark, op_impl, mode, size, bench_device, gpu_bandwidth, bench_scale):
    _bench_op(benchmark, "gaussian_head", op_impl, mode, size, bench_device, gpu_bandwidth, bench_scale)
