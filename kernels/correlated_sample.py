"""Op 1, the OU-correlated samples, as fused Triton kernels.

    z'_k = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps_k,   k = 0 .. K-1

z, mu, sigma: [B, *S] (any shape; non-contiguous inputs are made contiguous); output [K, B, *S]
in the input dtype. eps is drawn INSIDE the kernel from Triton's Philox4x32-10 (``tl.randint4x``):
row k (N = z.numel() elements) takes the ceil(N / 4) int64 counters ``offset_base + k * ceil(N / 4)
+ g``, and counter g gives elements 4g .. 4g + 3 its four words as two Box-Muller pairs (r1 cos t1,
r1 sin t1, r2 cos t2, r2 sin t2): a quarter of the Philox work of one ``tl.randn`` per element, and a
sin / cos without a slow path (``_sincos_2pi``). This stream is the Triton backend's own: the cpp and
cuda backends draw ``tl.randn(seed, offset_base + k * N + j)``. The noise is never stored: the
backward kernel regenerates it and reduces over k in one pass over the N elements:

    dz = rho sum_k g_k,   dmu = (1 - rho) sum_k g_k,   dsigma = sqrt(1 - rho^2) sum_k g_k eps_k

``correlated_noise(seed, K, shape, device)`` materialises exactly the eps the kernels use (float32
[K, *shape]) so tests can compare against the float64 reference in ``hvae_fast.ops.ou``.

Precision: float16 / bfloat16 / float32 inputs compute and accumulate in float32; float64 inputs
compute in float64 (Philox noise is float32 and is cast up: it is the same noise, only the
arithmetic around it is float64, which is what gradcheck needs). The coefficients rho, 1 - rho and
sqrt(1 - rho^2) are computed in Python double precision and passed as kernel arguments, each as two
float32 scalars hi + lo (``utils.split_f64``): exact float32 values in float32 compute, within 2^-48
relative in float64; rho = 1 gives z' = z exactly. A launch copies nothing from the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from torch.library import triton_op, wrap_triton

from hvae_fast.errors import HVAEError
from hvae_fast.ops.backends import check_offsets, check_ou_args, check_seed

from .utils import (check_float_dtype, check_same, compute_dtype, elementwise_block, join_f64, num_warps_for,
                    split_f64)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
# CUDA caps grid dimension 1 at 65535; K runs on that axis in the forward and noise kernels.
MAX_K = 65535


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sincos_2pi(u):
    """(sin 2 pi u, cos 2 pi u) for float32 u in [0, 1): u - q / 4 (q the nearest quarter turn) is
    exact, so x = 2 pi (u - q / 4) lies in [-pi/4, pi/4], where Taylor polynomials to x^9 / x^8 are
    within 3e-8; no slow path for large arguments (which tl.cos / tl.sin carry), and no libdevice."""
    q = tl.floor(u * 4.0 + 0.5)
    x = (u - q * 0.25) * 6.283185307179586
    x2 = x * x
    s = x + x * x2 * (-0.16666666666666666 + x2 * (0.008333333333333333 + x2 * (-0.0001984126984126984
                                                                             + x2 * 2.7557319223985893e-06)))
    c = 1.0 + x2 * (-0.5 + x2 * (0.041666666666666664 + x2 * (-0.001388888888888889 + x2 * 2.48015873015873e-05)))
    qi = q.to(tl.int32) & 3
    sin = tl.where(qi == 0, s, tl.where(qi == 1, c, tl.where(qi == 2, -s, -c)))
    cos = tl.where(qi == 0, c, tl.where(qi == 1, -s, tl.where(qi == 2, -c, s)))
    return sin, cos


@triton.jit
def _normals(seed, ctr, BLOCK: tl.constexpr):
    """[BLOCK] float32 normals from the BLOCK // 4 Philox counters ``ctr``: each counter's four words
    make two Box-Muller pairs, (r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2) for elements 4g .. 4g + 3."""
    c0, c1, c2, c3 = tl.randint4x(seed, ctr)
    u0 = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(c0))
    u2 = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(c2))
    r0 = tl.sqrt(-2.0 * tl.log(u0))
    r2 = tl.sqrt(-2.0 * tl.log(u2))
    s1, k1 = _sincos_2pi(tl.random.uint_to_uniform_float(c1))
    s3, k3 = _sincos_2pi(tl.random.uint_to_uniform_float(c3))
    # join(join(a, c), join(b, d)) is [BLOCK // 4, 2, 2] with a, b, c, d in row-major order
    return tl.reshape(tl.join(tl.join(r0 * k1, r2 * k3), tl.join(r0 * s1, r2 * s3)), [BLOCK])


@triton.jit
def _counters(pid, row, BLOCK: tl.constexpr):
    """The Philox counters of element block ``pid`` in a row starting at counter ``row`` (int64)."""
    return row + pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)


@triton.jit(do_not_specialize=["seed", "offset_base"])
def _ou_noise_kernel(out_ptr, N, G, seed, offset_base, BLOCK: tl.constexpr):
    """out[k, j] = eps of (k, j), float32; grid (cdiv(N, BLOCK), K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < N
    eps = _normals(seed, _counters(pid, offset_base + k * G, BLOCK), BLOCK)
    tl.store(out_ptr + k * N + j, eps, mask=mask)


@triton.jit(do_not_specialize=["seed", "offset_base"])
def _ou_fwd_kernel(
    z_ptr, mu_ptr, sigma_ptr, out_ptr, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, N, G, seed, offset_base,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[k, j] = a z[j] + b mu[j] + c sigma[j] eps_k[j]; grid (cdiv(N, BLOCK), K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < N
    a = join_f64(a_hi, a_lo, ACC_DTYPE)  # rho
    b = join_f64(b_hi, b_lo, ACC_DTYPE)  # 1 - rho
    c = join_f64(c_hi, c_lo, ACC_DTYPE)  # sqrt(1 - rho^2)
    z = tl.load(z_ptr + j, mask=mask, other=0.0).to(ACC_DTYPE)
    mu = tl.load(mu_ptr + j, mask=mask, other=0.0).to(ACC_DTYPE)
    sigma = tl.load(sigma_ptr + j, mask=mask, other=0.0).to(ACC_DTYPE)
    eps = _normals(seed, _counters(pid, offset_base + k * G, BLOCK), BLOCK).to(ACC_DTYPE)
    out = a * z + b * mu + c * sigma * eps
    tl.store(out_ptr + k * N + j, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset_base"])
def _ou_bwd_kernel(
    g_ptr, dz_ptr, dmu_ptr, dsigma_ptr, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, N, G, K, seed, offset_base,
    BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """One pass over N elements, loop over k: regenerate eps_k, reduce g_k and g_k eps_k."""
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < N
    a = join_f64(a_hi, a_lo, ACC_DTYPE)
    b = join_f64(b_hi, b_lo, ACC_DTYPE)
    c = join_f64(c_hi, c_lo, ACC_DTYPE)
    acc_g = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_ge = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    idx = j  # int64 position of element j in row k: k * N + j
    ctr = _counters(pid, offset_base, BLOCK)  # row k: + k * G
    for _k in range(0, K):
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC_DTYPE)
        eps = _normals(seed, ctr, BLOCK).to(ACC_DTYPE)
        acc_g += g
        acc_ge += g * eps
        idx += N
        ctr += G
    tl.store(dz_ptr + j, (a * acc_g).to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dmu_ptr + j, (b * acc_g).to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dsigma_ptr + j, (c * acc_ge).to(dsigma_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _check_k(K: int) -> None:
    if K > MAX_K:
        raise HVAEError(f"the Triton OU kernels support K <= {MAX_K} samples, got {K}: reduce --ou-samples")


def _coefs(rho: float) -> tuple:
    """(a_hi, a_lo, b_hi, b_lo, c_hi, c_lo): rho, 1 - rho, sqrt(1 - rho^2) as kernel scalars (split_f64)."""
    rho = float(rho)
    return (*split_f64(rho), *split_f64(1.0 - rho), *split_f64(math.sqrt(max(0.0, 1.0 - rho * rho))))


def correlated_noise(seed: int, K: int, shape, device=None, *, offset_base: int = 0) -> torch.Tensor:
    """The eps [K, *shape] (float32) the Triton kernels draw for ``seed`` (counters base + k * ceil(N / 4) + j // 4)."""
    check_ou_args(0.5, K)
    _check_k(K)
    seed = check_seed(seed)
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = math.prod(shape)
    check_offsets(K, n, offset_base)
    out = torch.empty((K, *shape), dtype=torch.float32, device=device)
    if n == 0:
        return out
    block = elementwise_block(n)
    _ou_noise_kernel[(triton.cdiv(n, block), K)](
        out, n, triton.cdiv(n, 4), seed, int(offset_base), BLOCK=block, num_warps=num_warps_for(block)
    )
    return out


# The two kernels as torch operators (torch.library.triton_op: torch.compile sees through them to
# the kernels); autograd is registered on the forward op, the fake kernels are traced by torch.

@triton_op("hvae_fast_triton::correlated_samples_fwd", mutates_args=())
def correlated_samples_fwd(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, rho: float, K: int, seed: int,
                           offset_base: int) -> torch.Tensor:
    """Contiguous z, mu, sigma [*S] of one dtype -> [K, *S] in that dtype."""
    n = z.numel()
    out = torch.empty((K, *z.shape), dtype=z.dtype, device=z.device)
    if n == 0:
        return out
    acc = compute_dtype(z.dtype)
    block = elementwise_block(n)
    wrap_triton(_ou_fwd_kernel)[(triton.cdiv(n, block), K)](
        z, mu, sigma, out, *_coefs(rho), n, triton.cdiv(n, 4), seed, offset_base,
        BLOCK=block, ACC_DTYPE=_TL_DTYPE[acc], num_warps=num_warps_for(block),
    )
    return out


@triton_op("hvae_fast_triton::correlated_samples_bwd", mutates_args=())
def correlated_samples_bwd(grad: torch.Tensor, rho: float, K: int, seed: int,
                           offset_base: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous grad [K, *S] -> (dz, dmu, dsigma), each [*S] in grad's dtype; eps regenerated."""
    shape = grad.shape[1:]
    dz, dmu, dsigma = (torch.empty(shape, dtype=grad.dtype, device=grad.device) for _ in range(3))
    n = dz.numel()
    if n == 0:
        return dz, dmu, dsigma
    acc = compute_dtype(grad.dtype)
    block = elementwise_block(n)
    wrap_triton(_ou_bwd_kernel)[(triton.cdiv(n, block),)](
        grad, dz, dmu, dsigma, *_coefs(rho), n, triton.cdiv(n, 4), K, seed, offset_base,
        BLOCK=block, ACC_DTYPE=_TL_DTYPE[acc], num_warps=num_warps_for(block),
    )
    return dz, dmu, dsigma


# Explicit fake kernels: the Triton CPU interpreter runs wrap_triton's kernels even on fake tensors,
# so the traced default does not work under TRITON_INTERPRET=1.
@correlated_samples_fwd.register_fake
def _(z, mu, sigma, rho, K, seed, offset_base):
    return z.new_empty((K, *z.shape))


@correlated_samples_bwd.register_fake
def _(grad, rho, K, seed, offset_base):
    return tuple(grad.new_empty(grad.shape[1:]) for _ in range(3))


def _setup(ctx, inputs, output):
    _, _, _, ctx.rho, ctx.K, ctx.seed, ctx.offset_base = inputs


def _backward(ctx, grad):
    dz, dmu, dsigma = correlated_samples_bwd(grad.contiguous(), ctx.rho, ctx.K, ctx.seed, ctx.offset_base)
    need = ctx.needs_input_grad
    return dz if need[0] else None, dmu if need[1] else None, dsigma if need[2] else None, None, None, None, None


torch.library.register_autograd("hvae_fast_triton::correlated_samples_fwd", _backward, setup_context=_setup)


def correlated_samples(z, mu, sigma, rho: float, K: int, seed: int, *, offset_base: int = 0):
    """z' [K, *z.shape] = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps, eps drawn in-kernel."""
    check_ou_args(rho, K)
    _check_k(K)
    seed = seed if torch.compiler.is_compiling() else check_seed(seed)
    names = ("z", "mu", "sigma")
    tensors = (z, mu, sigma)
    for n_, t in zip(names, tensors):
        check_float_dtype(n_, t)
    check_same(names, tensors, "shape")
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    check_offsets(K, z.numel(), offset_base)
    return correlated_samples_fwd(z.contiguous(), mu.contiguous(), sigma.contiguous(), float(rho), int(K), seed,
                                  int(offset_base))
