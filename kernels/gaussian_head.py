"""Op 2, the Monte Carlo average with the Gaussian head, as fused Triton kernels.

Inputs mean_raw, scale_raw [K, B, *S], target [B, *S]; output [B] (float32, or float64 for
float64 inputs) = sum over S of log N(target | mu_bar, sigma_bar), where
sigma_k = softplus(scale_raw_k) + min_scale (torch's softplus, threshold 20) and

    mode "mean-std": mu_bar = mean_k mean_raw_k,                      sigma_bar = mean_k sigma_k
    mode "ratio":    mu_bar = sigma_bar * mean_k (mean_raw_k / sigma_k), sigma_bar = mean_k sigma_k

Forward: one kernel over the M = B * S elements (grid over element blocks, loop over k inside)
writes the per-element log-density into an [B, S] buffer; the per-row sum is then ``.sum(1)`` in
torch: deterministic (no atomics) and simple. The same kernel writes the [B, S] averages mu_bar,
sigma_bar that the backward needs; no [K, B, S] intermediate is saved.

Backward: one kernel over the M elements, loop over k inside, recomputing sigma_k from scale_raw:
with g the upstream grad of the row, t the target, m = mu_bar, s = sigma_bar:
    dm = g (t - m) / s^2,  ds = g (-1/s + (t - m)^2 / s^3),  dt = -dm
    mean-std: d mean_raw_k = dm / K;  d scale_raw_k = (ds / K) softplus'(scale_raw_k)
    ratio:    dr = dm s;  ds_tot = ds + dm m / s = g (-1/s + (t - m) t / s^3) (no cancellation);
              d mean_raw_k = dr / (K sigma_k)
              d sigma_k = ds_tot / K - dr mean_raw_k / (K sigma_k^2);  d scale_raw_k = d sigma_k softplus'
softplus'(x) = 1 for x > 20 (torch's threshold), else e^x / (e^x + 1).

min_scale is a kernel argument (two float32 scalars, ``utils.split_f64``): a launch copies nothing
from the host. Precision: fp16 / bf16 / fp32 compute in float32; if any input is float64 everything computes in
float64 (gradcheck). Gradients come back in each input's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from torch.library import triton_op, wrap_triton

from hvae_fast.errors import HVAEError
from hvae_fast.ops.backends import OU_TARGETS, head_saved_inputs, packed_rows

from .utils import check_float_dtype, check_same, elementwise_block, join_f64, num_warps_for, split_f64

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
HALF_LOG_2PI: tl.constexpr = tl.constexpr(0.5 * math.log(2.0 * math.pi))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus(x) (beta 1, threshold 20): x if x > 20 else log1p(exp(x)).

    log1p is written with the Kahan trick, log(u) * z / (u - 1) with u = 1 + z, accurate for tiny
    z = exp(x) without needing libdevice (which the CPU interpreter lacks).
    """
    z = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + z
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    lp = tl.where(u == 1.0, z, tl.log(u) * (z / den))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _softplus_grad(x):
    """d softplus / dx as torch computes it: 1 above the threshold 20, else e^x / (e^x + 1)."""
    z = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, 1.0, z / (z + 1.0))


@triton.jit
def _row_offsets(e, S, sK, sB):
    """Offsets of the elements e (< B S) of row k = 0 of a [K, B, S] input with strides (sK, sB, 1);
    row k adds k * sK."""
    b = e // S
    return b * sB + (e - b * S)


@triton.jit
def _gh_fwd_kernel(
    mean_ptr, scale_ptr, t_ptr, logp_ptr, mbar_ptr, sbar_ptr, ms_hi, ms_lo, M, S, K,
    m_sK, m_sB, s_sK, s_sB,
    BLOCK: tl.constexpr, RATIO: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < M
    min_scale = join_f64(ms_hi, ms_lo, ACC_DTYPE)
    half_log_2pi = tl.full([BLOCK], HALF_LOG_2PI, ACC_DTYPE)  # an exact constant of the dtype
    acc_s = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_m = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    m_idx = _row_offsets(e, S, m_sK, m_sB)  # int64: k * sK + b * sB + s
    s_idx = _row_offsets(e, S, s_sK, s_sB)
    for _k in range(0, K):
        x = tl.load(scale_ptr + s_idx, mask=mask, other=0.0).to(ACC_DTYPE)
        mr = tl.load(mean_ptr + m_idx, mask=mask, other=0.0).to(ACC_DTYPE)
        sig = _softplus(x) + min_scale
        acc_s += sig
        if RATIO:
            acc_m += mr / sig
        else:
            acc_m += mr
        m_idx += m_sK
        s_idx += s_sK
    s = acc_s / K
    if RATIO:
        m = s * (acc_m / K)
    else:
        m = acc_m / K
    t = tl.load(t_ptr + e, mask=mask, other=0.0).to(ACC_DTYPE)
    d = (t - m) / s
    logp = -half_log_2pi - tl.log(s) - 0.5 * d * d
    tl.store(logp_ptr + e, logp, mask=mask)
    tl.store(mbar_ptr + e, m, mask=mask)
    tl.store(sbar_ptr + e, s, mask=mask)


@triton.jit
def _gh_bwd_kernel(
    g_ptr, mean_ptr, scale_ptr, t_ptr, mbar_ptr, sbar_ptr,
    dmean_ptr, dscale_ptr, dt_ptr, ms_hi, ms_lo, M, S, K,
    m_sK, m_sB, s_sK, s_sB,
    BLOCK: tl.constexpr, RATIO: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < M
    min_scale = join_f64(ms_hi, ms_lo, ACC_DTYPE)
    row = e // S
    g = tl.load(g_ptr + row, mask=mask, other=0.0).to(ACC_DTYPE)
    t = tl.load(t_ptr + e, mask=mask, other=0.0).to(ACC_DTYPE)
    m = tl.load(mbar_ptr + e, mask=mask, other=0.0).to(ACC_DTYPE)
    s = tl.load(sbar_ptr + e, mask=mask, other=1.0).to(ACC_DTYPE)
    diff = t - m
    inv_s = 1.0 / s
    dm = g * diff * inv_s * inv_s
    ds = g * (diff * diff * inv_s * inv_s - 1.0) * inv_s
    tl.store(dt_ptr + e, (-dm).to(dt_ptr.dtype.element_ty), mask=mask)
    idx = e  # the gradients are packed [K, M]; the inputs strided (m_idx, s_idx)
    s_idx = _row_offsets(e, S, s_sK, s_sB)
    if RATIO:
        # ds + dm * r with r = m / s, written as g (t (t - m) / s^2 - 1) / s: the same value without
        # the cancellation of two large terms when |r| is large (as in csrc/ou_cpu_kernels.cpp)
        dr_k = dm * s / K
        ds_k = g * (diff * t * inv_s * inv_s - 1.0) * inv_s / K
        m_idx = _row_offsets(e, S, m_sK, m_sB)
        for _k in range(0, K):
            x = tl.load(scale_ptr + s_idx, mask=mask, other=0.0).to(ACC_DTYPE)
            mr = tl.load(mean_ptr + m_idx, mask=mask, other=0.0).to(ACC_DTYPE)
            sig = _softplus(x) + min_scale
            inv_sig = 1.0 / sig
            dmr = dr_k * inv_sig
            dsig = ds_k - dmr * mr * inv_sig
            tl.store(dmean_ptr + idx, dmr.to(dmean_ptr.dtype.element_ty), mask=mask)
            tl.store(dscale_ptr + idx, (dsig * _softplus_grad(x)).to(dscale_ptr.dtype.element_ty), mask=mask)
            idx += M
            m_idx += m_sK
            s_idx += s_sK
    else:
        dm_k = (dm / K).to(dmean_ptr.dtype.element_ty)
        ds_k = ds / K
        for _k in range(0, K):
            x = tl.load(scale_ptr + s_idx, mask=mask, other=0.0).to(ACC_DTYPE)
            tl.store(dmean_ptr + idx, dm_k, mask=mask)
            tl.store(dscale_ptr + idx, (ds_k * _softplus_grad(x)).to(dscale_ptr.dtype.element_ty), mask=mask)
            idx += M
            s_idx += s_sK


# ----------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------

def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# The two kernels as torch operators (torch.library.triton_op); autograd on the forward op.

@triton_op("hvae_fast_triton::gaussian_head_fwd", mutates_args=())
def gaussian_head_fwd(mean_raw: torch.Tensor, scale_raw: torch.Tensor, target: torch.Tensor, ratio: bool,
                      min_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean_raw, scale_raw [K, B, *S] with packed *S (any K and B strides), target contiguous
    -> (logp_per_row [B], mu_bar, sigma_bar [B, *S]), all in the acc dtype."""
    K, B = mean_raw.shape[0], mean_raw.shape[1]
    M = target.numel()
    S = M // B if B else 0
    acc = _acc_dtype(mean_raw, scale_raw, target)
    dev = target.device
    mbar = torch.empty(target.shape, dtype=acc, device=dev)
    sbar = torch.empty(target.shape, dtype=acc, device=dev)
    if M == 0:
        return torch.zeros(B, dtype=acc, device=dev), mbar, sbar
    logp = torch.empty((B, S), dtype=acc, device=dev)
    block = elementwise_block(M)
    wrap_triton(_gh_fwd_kernel)[(triton.cdiv(M, block),)](
        mean_raw, scale_raw, target, logp, mbar, sbar, *split_f64(min_scale), M, S, K, *mean_raw.stride()[:2], *scale_raw.stride()[:2],
        BLOCK=block, RATIO=ratio, ACC_DTYPE=_TL_DTYPE[acc], num_warps=num_warps_for(block),
    )
    return logp.sum(1), mbar, sbar


@triton_op("hvae_fast_triton::gaussian_head_bwd", mutates_args=())
def gaussian_head_bwd(grad: torch.Tensor, mean_raw: torch.Tensor, scale_raw: torch.Tensor, target: torch.Tensor,
                      mbar: torch.Tensor, sbar: torch.Tensor, ratio: bool, min_scale: float,
                      mean_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad [B] -> (d mean_raw in mean_dtype, d scale_raw, d target). mean_raw is read in the ratio
    mode only (callers pass scale_raw in its place in the mean-std mode)."""
    K, B = scale_raw.shape[0], scale_raw.shape[1]
    M = target.numel()
    S = M // B if B else 0
    acc = mbar.dtype
    dev = target.device
    dmean = torch.empty(scale_raw.shape, dtype=mean_dtype, device=dev)
    dscale = torch.empty(scale_raw.shape, dtype=scale_raw.dtype, device=dev)
    dt = torch.empty_like(target)
    if M == 0:
        return dmean, dscale, dt
    block = elementwise_block(M)
    wrap_triton(_gh_bwd_kernel)[(triton.cdiv(M, block),)](
        grad, mean_raw, scale_raw, target, mbar, sbar, dmean, dscale, dt, *split_f64(min_scale), M, S, K,
        *mean_raw.stride()[:2], *scale_raw.stride()[:2],
        BLOCK=block, RATIO=ratio, ACC_DTYPE=_TL_DTYPE[acc], num_warps=num_warps_for(block),
    )
    return dmean, dscale, dt


# Explicit fake kernels: the Triton CPU interpreter runs wrap_triton's kernels even on fake tensors,
# so the traced default does not work under TRITON_INTERPRET=1.
@gaussian_head_fwd.register_fake
def _(mean_raw, scale_raw, target, ratio, min_scale):
    acc = _acc_dtype(mean_raw, scale_raw, target)
    return (target.new_empty(target.shape[:1], dtype=acc), target.new_empty(target.shape, dtype=acc),
            target.new_empty(target.shape, dtype=acc))


@gaussian_head_bwd.register_fake
def _(grad, mean_raw, scale_raw, target, mbar, sbar, ratio, min_scale, mean_dtype):
    return (scale_raw.new_empty(scale_raw.shape, dtype=mean_dtype), scale_raw.new_empty(scale_raw.shape),
            torch.empty_like(target))


def _setup(ctx, inputs, output):
    mean_raw, scale_raw, target, ctx.ratio, ctx.min_scale = inputs
    _, mbar, sbar = output
    ctx.mean_dtype = mean_raw.dtype
    # the inputs the backward reads (views of the caller's, or a compact scale_raw in the mean-std
    # mode: hvae_fast.ops.backends.head_saved_inputs) plus the [B, *S] averages
    ctx.save_for_backward(*head_saved_inputs(mean_raw, scale_raw, ctx.ratio), target, mbar, sbar)


def _backward(ctx, grad, _grad_mbar, _grad_sbar):
    mean_raw, scale_raw, target, mbar, sbar = ctx.saved_tensors
    dmean, dscale, dt = gaussian_head_bwd(grad.contiguous(), mean_raw if ctx.ratio else scale_raw, scale_raw, target,
                                          mbar, sbar, ctx.ratio, ctx.min_scale, ctx.mean_dtype)
    need = ctx.needs_input_grad
    return dmean if need[0] else None, dscale if need[1] else None, dt if need[2] else None, None, None


torch.library.register_autograd("hvae_fast_triton::gaussian_head_fwd", _backward, setup_context=_setup)


def gaussian_head_logprob(mean_raw, scale_raw, target, mode: str = "mean-std", min_scale: float = 1e-3):
    """[B] = sum over S of log N(target | mu_bar, sigma_bar), averaged head over the K samples."""
    if mode not in OU_TARGETS:
        raise HVAEError(f"unknown OU target {mode!r}: choose one of {', '.join(OU_TARGETS)}")
    for n_, t in (("mean_raw", mean_raw), ("scale_raw", scale_raw), ("target", target)):
        check_float_dtype(n_, t)
    check_same(("mean_raw", "scale_raw"), (mean_raw, scale_raw), "shape")
    check_same(("mean_raw", "scale_raw", "target"), (mean_raw, scale_raw, target), "device")
    if mean_raw.dim() < 2 or tuple(mean_raw.shape[1:]) != tuple(target.shape):
        raise HVAEError(
            f"gaussian_head_logprob needs mean_raw/scale_raw of shape [K, *target.shape], got "
            f"{tuple(mean_raw.shape)} for target {tuple(target.shape)}"
        )
    if mean_raw.shape[0] < 1:
        raise HVAEError("gaussian_head_logprob needs K >= 1 samples, got an empty first dimension")
    min_scale = float(min_scale)
    if not (min_scale >= 0.0 and math.isfinite(min_scale)):
        raise HVAEError(f"min_scale must be a finite number >= 0, got {min_scale}")
    # the model's mean_raw / scale_raw (halves of one [K, B, 2C, ...] tensor) are read in place
    mean_raw, scale_raw = (t if packed_rows(t) else t.contiguous() for t in (mean_raw, scale_raw))
    return gaussian_head_fwd(mean_raw, scale_raw, target.contiguous(), mode == "ratio", min_scale)[0]
