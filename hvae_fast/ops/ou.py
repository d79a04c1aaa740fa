"""Ornstein-Uhlenbeck smoothing: the two ops the Hermite VAE needs, behind one backend switch.

The two ops (shapes: ``S`` is any per-example shape, ``[D]`` for MLP latents, ``[C, H, W]`` for
convolutional ones):

``correlated_samples(z, mu, sigma, rho, K, seed) -> [K, B, *S]``
    z'_k = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps_k, eps_k ~ N(0, I): K samples of the
    OU semigroup around the posterior sample z = mu + sigma e1 (method.md, eq. 4). Each backend
    draws eps from ``seed`` with its own generator; ``correlated_noise`` materialises exactly the
    eps a backend uses, so every backend can be checked against a float64 reference.

``gaussian_head_logprob(mean_raw, scale_raw, target, mode, min_scale) -> [B]``
    The Monte Carlo average over the K samples of a generator layer's Gaussian head, then
    log N(target | mu_bar, sigma_bar) summed over S. With sigma_k = softplus(scale_raw_k) + min_scale:
      mode "mean-std": mu_bar = mean_k mean_raw_k,            sigma_bar = mean_k sigma_k
      mode "ratio":    mu_bar = sigma_bar * mean_k (mean_raw_k / sigma_k), sigma_bar = mean_k sigma_k
    (the ratio mode smooths mu/sigma, the paper's alternative parameterisation).

The ``torch`` backend here is the ground truth (its correlated samples are the custom op
``hvae_fast_ref::correlated_samples``, so torch.compile need not trace its torch.Generator); fused backends (``triton``, ``cpp``, ``cuda``)
are loaded into ``BACKENDS`` on first use and are tested against it. They implement the
``Backend`` record of backends.py (which sits below this module, so loading them is no import
cycle). The model never knows which one runs: the trainer calls ``get_backend(name, device)``
once and hands the model the returned object.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

# check_ou_args is not used here: ou re-exports it with the rest of the backend contract.
from .autotune import auto_backend
from .backends import BACKEND_NAMES, OU_TARGETS, Backend, check_ou_args, check_seed
from ..distributions import fp32, gaussian_logprob
from ..errors import HVAEError

log = logging.getLogger("hvae_fast.ops.ou")


# ----------------------------------------------------------------------------------------------
# The pure-PyTorch reference (backend "torch")
# ----------------------------------------------------------------------------------------------

def torch_correlated_noise(seed: int, K: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """eps of shape [K, *shape] that the torch backend uses for ``seed``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.randn((K, *shape), generator=gen, device=device, dtype=dtype)


def correlated_samples_reference(z, mu, sigma, rho: float, eps: torch.Tensor) -> torch.Tensor:
    """z' = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps; z, mu, sigma [B, *S], eps [K, B, *S]."""
    return rho * z + (1.0 - rho) * mu + sigma * math.sqrt(max(0.0, 1.0 - rho * rho)) * eps


def gaussian_head_reference(mean_raw, scale_raw, target, mode: str = "mean-std", min_scale: float = 1e-3):
    """Averaged Gaussian head log-density, [B]. mean_raw, scale_raw [K, B, *S]; target [B, *S].
    float16/bfloat16 inputs are averaged in float32 (the fused kernels accumulate in float32 too)."""
    mean_raw, scale_raw = fp32(mean_raw), fp32(scale_raw)
    sigma = F.softplus(scale_raw) + min_scale
    sigma_bar = sigma.mean(0)
    if mode == "mean-std":
        mu_bar = mean_raw.mean(0)
    elif mode == "ratio":
        mu_bar = sigma_bar * (mean_raw / sigma).mean(0)
    else:
        raise HVAEError(f"unknown OU target {mode!r}: choose one of {', '.join(OU_TARGETS)}")
    return gaussian_logprob(target, mu_bar, sigma_bar)


# ----------------------------------------------------------------------------------------------
# Backend registry
# ----------------------------------------------------------------------------------------------

# The reference's noise comes from a torch.Generator, which torch.compile cannot create inside a
# graph: the reference is a custom op (opaque to the compiler), its gradient a second one that
# regenerates eps from the seed. Inputs: z, mu, sigma of one shape (each its own dtype); eps is
# drawn in z's dtype, as ``torch_correlated_noise(seed, K, z.shape, dtype=z.dtype)``.

@torch.library.custom_op("hvae_fast_ref::correlated_samples", mutates_args=())
def _ref_correlated_samples(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, rho: float, K: int,
                            seed: int) -> torch.Tensor:
    eps = torch_correlated_noise(seed, K, z.shape, z.device, dtype=z.dtype)
    return correlated_samples_reference(z, mu, sigma, rho, eps)


@_ref_correlated_samples.register_fake
def _(z, mu, sigma, rho, K, seed):
    dtype = torch.promote_types(torch.promote_types(z.dtype, mu.dtype), sigma.dtype)
    return z.new_empty((K, *z.shape), dtype=dtype)


@torch.library.custom_op("hvae_fast_ref::correlated_samples_bwd", mutates_args=())
def _ref_correlated_samples_bwd(grad: torch.Tensor, rho: float, K: int, seed: int,
                                eps_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad [K, *S] -> (dz, dmu, dsigma) [*S]: rho sum_k g, (1 - rho) sum_k g, c sum_k g eps_k."""
    eps = torch_correlated_noise(seed, K, grad.shape[1:], grad.device, dtype=eps_dtype)
    gs = grad.sum(0)
    return rho * gs, (1.0 - rho) * gs, math.sqrt(max(0.0, 1.0 - rho * rho)) * (grad * eps).sum(0)


@_ref_correlated_samples_bwd.register_fake
def _(grad, rho, K, seed, eps_dtype):
    return tuple(grad.new_empty(grad.shape[1:]) for _ in range(3))


def _ref_setup(ctx, inputs, output):
    z, _, _, ctx.rho, ctx.K, ctx.seed = inputs
    ctx.eps_dtype = z.dtype


def _ref_backward(ctx, grad):
    dz, dmu, dsigma = _ref_correlated_samples_bwd(grad, ctx.rho, ctx.K, ctx.seed, ctx.eps_dtype)
    return dz, dmu, dsigma, None, None, None  # autograd casts each to its input's dtype


_ref_correlated_samples.register_autograd(_ref_backward, setup_context=_ref_setup)


def _torch_correlated_samples(z, mu, sigma, rho, K, seed):
    check_ou_args(rho, K)
    seed = seed if torch.compiler.is_compiling() else check_seed(seed)
    z, mu, sigma = torch.broadcast_tensors(z, mu, sigma)
    return _ref_correlated_samples(z, mu, sigma, float(rho), int(K), seed)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        name="torch",
        correlated_samples=_torch_correlated_samples,
        gaussian_head_logprob=gaussian_head_reference,
        correlated_noise=torch_correlated_noise,
        probe=lambda device: (True, "pure PyTorch reference"),
    )
}

# `auto`'s candidates per device type, in the order that breaks ties (the Triton interpreter on CPU
# is for tests only, never a candidate).
AUTO_CANDIDATES = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_registered = False


def _register_fused_backends() -> None:
    """Import the optional backends lazily so that `import hvae_fast` stays cheap."""
    global _registered
    if _registered:
        return
    _registered = True
    for modname in ("hvae_fast.kernels.backend", "hvae_fast.ops.native"):
        try:
            mod = __import__(modname, fromlist=["BACKENDS"])
        except Exception as exc:  # an import failure is reported by `info`, never hidden
            log.warning("OU backends from %s unavailable: %s", modname, exc)
            continue
        for b in getattr(mod, "BACKENDS", ()):
            BACKENDS[b.name] = b


def backend_status(device) -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every known backend on ``device``."""
    _register_fused_backends()
    device = torch.device(device)
    out = {}
    for name in ("triton", "cuda", "cpp", "torch"):
        b = BACKENDS.get(name)
        if b is None:
            out[name] = (False, "not installed (module failed to import; see the log)")
        elif device.type not in b.devices:
            out[name] = (False, f"does not run on {device.type}")
        else:
            try:
                out[name] = b.probe(device)
            except Exception as exc:
                out[name] = (False, f"probe failed: {exc}")
    return out


def get_backend(name: str, device) -> Backend:
    """Resolve ``name`` to an available backend for ``device`` (logs the choice); ``auto`` is the
    backend of hvae_fast/ops/autotune.py, which picks per op and shape class from a cached measurement."""
    if name not in BACKEND_NAMES:
        raise HVAEError(f"unknown OU backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    device = torch.device(device)
    status = backend_status(device)
    if name == "auto":
        cands = {}
        for cand in AUTO_CANDIDATES.get(device.type, ("torch",)):
            ok, why = status[cand]
            if ok:
                cands[cand] = BACKENDS[cand]
            else:
                log.info("OU backend auto on %s: %r is not a candidate (%s)", device.type, cand, why)
        return auto_backend(device, cands or {"torch": BACKENDS["torch"]})
    ok, why = status[name]
    if not ok:
        raise HVAEError(
            f"OU backend {name!r} is not available on {device.type}: {why}. "
            f"Run `hvae-fast info` for details, or pass --backend torch"
        )
    log.info("OU backend: %r on %s (%s)", name, device.type, why)
    return BACKENDS[name]
