"""Tests of the fused Triton OU kernels (hvae_fast.kernels) against the float64 references in ou.py.

Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, set below
before the kernel modules are imported; CI exports it for the whole suite anyway). The
interpreter is slow, so sizes are small and parametrizations few.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from hvae_fast.errors import HVAEError  # noqa: E402
from hvae_fast.kernels.backend import BACKENDS, probe  # noqa: E402
from hvae_fast.kernels.correlated_sample import correlated_noise, correlated_samples  # noqa: E402
from hvae_fast.kernels.gaussian_head import gaussian_head_logprob  # noqa: E402
from hvae_fast.ou import correlated_samples_reference, gaussian_head_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SHAPES = [(100, 40), (7, 13), (4, 8, 16, 16), (3, 5, 7, 7)]
SHAPE_IDS = ["mlp100x40", "mlp7x13", "conv4x8x16x16", "conv3x5x7x7"]


def _noncontig(shape, gen):
    """A non-contiguous float32 tensor of ``shape``: a transposed / channels-last-permuted view."""
    if len(shape) == 2:
        return torch.randn(shape[1], shape[0], generator=gen).to(DEVICE).t()
    b, c, h, w = shape
    return torch.randn(b, h, w, c, generator=gen).to(DEVICE).permute(0, 3, 1, 2)


def _inputs(shape, seed, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        z, mu = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
        sigma = torch.rand(shape, generator=gen).to(DEVICE) + 0.1
    else:
        z, mu = _noncontig(shape, gen), _noncontig(shape, gen)
        sigma = _noncontig(shape, gen).abs() + 0.1
        assert not z.is_contiguous()
    return z, mu, sigma


# ----------------------------------------------------------------------------------------------
# Op 1: correlated samples
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 10])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.95, 1.0])
def test_correlated_samples_matches_reference(shape, K, rho):
    # Tolerances (fp32 kernel vs fp64 reference fed the kernel's own noise): output atol=rtol=1e-5;
    # gradients (sums of K fp32 terms) atol 1e-4, rtol 1e-5.
    seed = 1234 + K
    contiguous = K == 1  # K=10 runs every shape on non-contiguous views (transposed / permuted)
    z, mu, sigma = (t.detach().requires_grad_() for t in _inputs(shape, 7, contiguous))
    out = correlated_samples(z, mu, sigma, rho, K, seed)
    assert out.shape == (K, *shape) and out.dtype == torch.float32

    eps = correlated_noise(seed, K, shape, DEVICE).double()
    zd, mud, sd = (t.detach().double().requires_grad_() for t in (z, mu, sigma))
    ref = correlated_samples_reference(zd, mud, sd, rho, eps)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out.backward(g)
    ref.backward(g.double())
    for got, want in ((z.grad, zd.grad), (mu.grad, mud.grad), (sigma.grad, sd.grad)):
        assert got.dtype == torch.float32 and got.shape == shape
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16/fp16 kernels are checked on CUDA only (slow and "
                    "not representative under the CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_correlated_samples_half_precision(dtype):
    # Tolerance: the output is rounded to dtype, so atol=rtol=2e-2 (bf16) / 2e-3 (fp16) vs fp64.
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    shape, K, rho, seed = (4, 8, 16, 16), 5, 0.9, 11
    z, mu, sigma = (t.to(dtype).detach().requires_grad_() for t in _inputs(shape, 1))
    out = correlated_samples(z, mu, sigma, rho, K, seed)
    assert out.dtype == dtype
    eps = correlated_noise(seed, K, shape, DEVICE).double()
    zd, mud, sd = (t.detach().double().requires_grad_() for t in (z, mu, sigma))
    ref = correlated_samples_reference(zd, mud, sd, rho, eps)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for got, want in ((z.grad, zd.grad), (mu.grad, mud.grad), (sigma.grad, sd.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=5 * tol, rtol=tol)


def test_correlated_samples_gradcheck_float64():
    # gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3): the kernel computes in float64 for
    # float64 inputs; the Philox noise is float32 cast to float64 and is fixed by the seed.
    z, mu, sigma = (t.double().detach().requires_grad_() for t in _inputs((2, 3), 5))
    assert torch.autograd.gradcheck(lambda a, b, c: correlated_samples(a, b, c, 0.7, 2, 99), (z, mu, sigma))


def test_rho_one_is_identity_and_rho_zero_averages_to_mu():
    # rho = 1: exact equality (coefficients 1, 0, 0), dsigma exactly 0.
    z, mu, sigma = (t.detach().requires_grad_() for t in _inputs((5, 6), 2))
    out = correlated_samples(z, mu, sigma, 1.0, 4, 17)
    assert torch.equal(out, z.detach().expand(4, 5, 6))
    out.sum().backward()
    assert torch.equal(sigma.grad, torch.zeros_like(sigma))
    assert torch.equal(z.grad, torch.full_like(z, 4.0))
    # rho = 0: z' no longer depends on z and mean_k z'_k = mu + sigma mean_k eps_k -> mu at rate
    # 1/sqrt(K): over N = 2000 elements the RMS of (mean_k z'_k - mu) / sigma times sqrt(K) is 1
    # up to ~1.6% (std), bound [0.9, 1.1]; and the overall mean of it within 6 / sqrt(K N).
    K = 64
    z, mu, sigma = _inputs((50, 40), 4)
    out0 = correlated_samples(z, mu, sigma, 0.0, K, 23)
    assert torch.equal(out0, correlated_samples(z + 5.0, mu, sigma, 0.0, K, 23))
    dev = (out0.mean(0) - mu) / sigma
    assert 0.9 < dev.pow(2).mean().sqrt().item() * math.sqrt(K) < 1.1
    assert abs(dev.mean().item()) < 6.0 / math.sqrt(K * z.numel())


def test_correlated_samples_validation():
    z, mu, sigma = _inputs((2, 3), 0)
    for bad_rho in (-0.1, 1.5, float("nan")):
        with pytest.raises(HVAEError, match="rho"):
            correlated_samples(z, mu, sigma, bad_rho, 2, 0)
    for bad_k in (0, -1, 2.0):
        with pytest.raises(HVAEError, match="K"):
            correlated_samples(z, mu, sigma, 0.5, bad_k, 0)
    with pytest.raises(HVAEError, match="same shape"):
        correlated_samples(z, mu[:1], sigma, 0.5, 2, 0)
    with pytest.raises(HVAEError, match="seed"):
        correlated_samples(z, mu, sigma, 0.5, 2, -3)
    # K * N >= 2**62 Philox offsets: refused before anything is allocated (the expanded view
    # costs no memory; 2**47 elements * K = 2**15 = 2**62).
    huge = torch.zeros(1, device=DEVICE).expand(2**47)
    with pytest.raises(HVAEError, match="2\\*\\*62"):
        correlated_samples(huge, huge, huge, 0.5, 2**15, 0)
    with pytest.raises(HVAEError, match="2\\*\\*62"):
        correlated_noise(0, 2, (2**61,), DEVICE)


# ----------------------------------------------------------------------------------------------
# Noise: statistics, determinism, 64-bit offsets
# ----------------------------------------------------------------------------------------------

def test_noise_statistics():
    # 8 x 131072 ~ 1.05e6 samples: std of the mean / correlation estimates ~1e-3, of the variance
    # ~1.4e-3; bounds: |mean| < 0.005, |var - 1| < 0.01, |corr(k, k+1)|, |corr(j, j+1)| < 0.005.
    eps = correlated_noise(2024, 8, (131072,), DEVICE).double().cpu()
    assert abs(eps.mean().item()) < 0.005
    assert abs(eps.var().item() - 1.0) < 0.01
    r_k = (eps[:-1] * eps[1:]).mean().item()  # sample k vs k+1, same element
    r_j = (eps[:, :-1] * eps[:, 1:]).mean().item()  # neighbouring elements, same sample
    assert abs(r_k) < 0.005 and abs(r_j) < 0.005
    assert not torch.isnan(eps).any() and eps.abs().max().item() < 7.0


def test_noise_determinism_and_kernel_consistency():
    # Exact equality: same seed -> bit-identical output; correlated_samples uses exactly that noise.
    a = correlated_noise(5, 3, (4, 6), DEVICE)
    b = correlated_noise(5, 3, (4, 6), DEVICE)
    c = correlated_noise(6, 3, (4, 6), DEVICE)
    assert torch.equal(a, b)
    assert (a != c).float().mean().item() > 0.99
    z = torch.zeros(4, 6, device=DEVICE)
    ones = torch.ones(4, 6, device=DEVICE)
    # rho = 0, mu = 0, sigma = 1 -> z'_k = eps_k exactly
    assert torch.equal(correlated_samples(z, z, ones, 0.0, 3, 5), a)
    assert not torch.equal(correlated_samples(z, z, ones, 0.0, 3, 6), a)
    # row k of a K-sample draw is the 1-sample draw at offset_base = k * N
    for k in range(3):
        assert torch.equal(correlated_noise(5, 1, (4, 6), DEVICE, offset_base=k * 24)[0], a[k])


# Triton's Philox4x32-10 and randn (triton/language/random.py), re-implemented in numpy to check
# that the kernels' int64 offsets reach the generator unwrapped: lo word -> counter c0, hi -> c1.
_M32 = np.uint64(0xFFFFFFFF)


def _philox_randn_reference(seed: int, offsets: np.ndarray) -> np.ndarray:
    offsets = offsets.astype(np.uint64)
    c0, c1 = offsets & _M32, offsets >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p_b, p_a = B * c2, A * c0  # < 2**64: exact in uint64
        c0, c2, c1, c3 = (p_b >> np.uint64(32)) ^ c1 ^ k0, (p_a >> np.uint64(32)) ^ c3 ^ k1, p_b & _M32, p_a & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32

    def uniform(x):
        x = x.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)
        return x.astype(np.float32) * np.float32(4.6566127342e-10)

    u1 = np.maximum(np.float32(1e-7), uniform(c0)).astype(np.float64)
    u2 = uniform(c1).astype(np.float64)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_noise_64bit_offsets_match_philox(seed):
    # Tolerance atol 2e-5: the kernel's Box-Muller runs in float32, the reference in float64 from the
    # same float32 uniforms; a wrong (wrapped or truncated) offset gives O(1) differences.
    shape, K = (5,), 3
    for base in (5, 2**32 + 5, 2**32 - 7, 3 * 2**40 + 11):  # 2**32 - 7 straddles the 2**32 boundary
        got = correlated_noise(seed, K, shape, DEVICE, offset_base=base).cpu().double().numpy()
        offs = base + np.arange(K * 5, dtype=np.uint64).reshape(K, 5)
        np.testing.assert_allclose(got, _philox_randn_reference(seed, offs), atol=2e-5, rtol=0)
    low = correlated_noise(seed, 1, (8,), DEVICE, offset_base=5)
    high = correlated_noise(seed, 1, (8,), DEVICE, offset_base=2**32 + 5)
    assert not torch.equal(low, high)  # no wrap-around at 2**32


# ----------------------------------------------------------------------------------------------
# Op 2: the Gaussian head
# ----------------------------------------------------------------------------------------------

def _head_inputs(K, shape, seed, extreme=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mean_raw = torch.randn((K, *shape), generator=gen) * 2
    scale_raw = torch.randn((K, *shape), generator=gen) * 3
    target = torch.randn(shape, generator=gen) * 2
    if extreme:  # softplus stability: far above the threshold 20 and far below 0
        flat = scale_raw.view(K, -1)
        flat[0, :3] = 30.0
        flat[-1, 3:6] = -30.0
        flat[:, 6:8] = 25.0
    return tuple(t.to(DEVICE, dtype) for t in (mean_raw, scale_raw, target))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("K", [1, 5, 10])
@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_gaussian_head_matches_reference(shape, K, mode):
    # Tolerances vs the float64 reference on the same inputs: log-density atol 1e-3, rtol 1e-5
    # (a softplus(-30) + 1e-3 scale makes per-element terms ~1e6, so fp32 error is relative);
    # gradients atol 1e-5 * max|grad| + rtol 1e-4.
    mean_raw, scale_raw, target = (t.requires_grad_() for t in _head_inputs(K, shape, 10 * K + len(shape)))
    if K == 5:  # non-contiguous target / inputs
        target = target.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        mean_raw = mean_raw.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        assert not target.is_contiguous() and not mean_raw.is_contiguous()
    out = gaussian_head_logprob(mean_raw, scale_raw, target, mode=mode, min_scale=1e-3)
    assert out.shape == (shape[0],) and out.dtype == torch.float32

    leaves = (mean_raw, scale_raw, target)
    dleaves = tuple(t.detach().double().requires_grad_() for t in leaves)
    ref = gaussian_head_reference(*dleaves, mode=mode, min_scale=1e-3)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-5)

    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(g)
    ref.backward(g.double())
    for got, want in zip((t.grad for t in leaves), (t.grad for t in dleaves)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        atol = 1e-5 * want.abs().max().item() + 1e-7
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_gaussian_head_gradcheck_float64(mode):
    # gradcheck defaults (atol 1e-5, rtol 1e-3); float64 inputs compute in float64 in the kernel.
    mean_raw, scale_raw, target = (
        t.detach().requires_grad_() for t in _head_inputs(2, (2, 3), 0, extreme=False, dtype=torch.float64)
    )
    fn = lambda a, b, c: gaussian_head_logprob(a, b, c, mode=mode, min_scale=0.01)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mean_raw, scale_raw, target))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16/fp16 kernels are checked on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gaussian_head_half_precision(dtype):
    # Inputs rounded to dtype first, then the same rounded values go to the fp64 reference, so only
    # the fp32 arithmetic and the dtype of the returned gradients differ: rtol 1e-4 on the output,
    # gradients rounded to dtype: rtol 2e-2.
    K, shape = 5, (4, 8, 16, 16)
    leaves = tuple(t.requires_grad_() for t in _head_inputs(K, shape, 3, extreme=False, dtype=dtype))
    for mode in ("mean-std", "ratio"):
        for t in leaves:
            t.grad = None
        out = gaussian_head_logprob(*leaves, mode=mode)
        assert out.dtype == torch.float32
        dleaves = tuple(t.detach().double().requires_grad_() for t in leaves)
        ref = gaussian_head_reference(*dleaves, mode=mode)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-4)
        out.sum().backward()
        ref.sum().backward()
        for got, want in zip((t.grad for t in leaves), (t.grad for t in dleaves)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_gaussian_head_validation():
    mean_raw, scale_raw, target = _head_inputs(2, (3, 4), 0, extreme=False)
    with pytest.raises(HVAEError, match="unknown OU target"):
        gaussian_head_logprob(mean_raw, scale_raw, target, mode="bogus")
    with pytest.raises(HVAEError, match="shape"):
        gaussian_head_logprob(mean_raw, scale_raw, target[:, :2])
    with pytest.raises(HVAEError, match="same shape"):
        gaussian_head_logprob(mean_raw, scale_raw[:1], target)


# ----------------------------------------------------------------------------------------------
# Backend registration
# ----------------------------------------------------------------------------------------------

def test_backend_probe(monkeypatch):
    (b,) = BACKENDS
    assert b.name == "triton" and b.devices == ("cuda", "cpu")
    assert b.correlated_samples is correlated_samples and b.gaussian_head_logprob is gaussian_head_logprob
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = probe(torch.device("cpu"))
    assert ok and "interpreter" in why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = probe(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why
    if torch.cuda.is_available():
        ok, why = probe(torch.device("cuda"))
        assert ok and why.startswith("triton ")
