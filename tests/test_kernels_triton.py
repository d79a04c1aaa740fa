"""What only the fused Triton OU kernels (hvae_fast.kernels) have.

The forward / gradient / gradcheck / noise-statistics grids of every backend, Triton included, are
in tests/test_backends.py. Here: half precision (CUDA; on CPU, the interpreter checks that float16 /
bfloat16 inputs accumulate in float32), the Triton-specific argument checks,
``offset_base`` rows and 64-bit offsets against an independent Philox model, the probe.

Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, set below
before the kernel modules are imported; CI exports it for the whole suite anyway).
"""

from __future__ import annotations

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
from hvae_fast.ops.ou import correlated_samples_reference, gaussian_head_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

def _inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    z, mu = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
    sigma = torch.rand(shape, generator=gen).to(DEVICE) + 0.1
    return z, mu, sigma


# ----------------------------------------------------------------------------------------------
# Op 1: correlated samples
# ----------------------------------------------------------------------------------------------

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
# Noise: offset_base, 64-bit offsets
# ----------------------------------------------------------------------------------------------

def test_noise_offset_base_rows():
    # Exact: row k of a K-sample draw is the 1-sample draw at offset_base = k * ceil(N / 4) (a row
    # takes one Philox counter per four elements)
    a = correlated_noise(5, 3, (4, 6), DEVICE)
    for k in range(3):
        assert torch.equal(correlated_noise(5, 1, (4, 6), DEVICE, offset_base=k * 6)[0], a[k])


# Triton's Philox4x32-10 (triton/language/random.py), re-implemented in numpy to check the kernels'
# noise stream and that their int64 counters reach the generator unwrapped: lo word -> c0, hi -> c1.
_M32 = np.uint64(0xFFFFFFFF)


def _philox_words(seed: int, offsets: np.ndarray):
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

    return c0, c1, c2, c3


def _uniform(x):
    x = x.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def _kernel_noise_reference(seed: int, K: int, N: int, base: int) -> np.ndarray:
    """[K, N] eps of the Triton kernels: element (k, j) is word-pair lane j % 4 of the Philox counter
    base + k * ceil(N / 4) + j // 4, (r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2) with r = sqrt(-2 log
    u) from words 0 / 2 and t = 2 pi u from words 1 / 3 (float32 uniforms, float64 math)."""
    G = -(-N // 4)
    j = np.arange(N)
    ctr = base + (np.arange(K)[:, None] * G + j[None, :] // 4).astype(np.uint64)
    words = _philox_words(seed, ctr)
    w = [_uniform(c).astype(np.float64) for c in words]
    r = [np.sqrt(-2.0 * np.log(np.maximum(np.float32(1e-7), _uniform(c)).astype(np.float64)))
         for c in words[::2]]
    t = [6.283185307179586 * w[1], 6.283185307179586 * w[3]]
    lanes = [r[0] * np.cos(t[0]), r[0] * np.sin(t[0]), r[1] * np.cos(t[1]), r[1] * np.sin(t[1])]
    return np.choose(j[None, :] % 4, lanes)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_noise_64bit_offsets_match_philox(seed):
    # Tolerance atol 2e-5: the kernel's Box-Muller runs in float32, the reference in float64 from the
    # same float32 uniforms; a wrong (wrapped or truncated) offset gives O(1) differences.
    shape, K = (5,), 3
    for base in (5, 2**32 + 5, 2**32 - 7, 3 * 2**40 + 11):  # 2**32 - 7 straddles the 2**32 boundary
        got = correlated_noise(seed, K, shape, DEVICE, offset_base=base).cpu().double().numpy()
        np.testing.assert_allclose(got, _kernel_noise_reference(seed, K, 5, base), atol=2e-5, rtol=0)
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
    with pytest.raises(HVAEError, match="same shape"):
        gaussian_head_logprob(mean_raw, scale_raw[:1], target)


# ----------------------------------------------------------------------------------------------
# No host work per launch: scalars travel as kernel arguments (issue 19, defect 1)
# ----------------------------------------------------------------------------------------------

# Calls that copy host data to a device, or wait for one: a torch.tensor(..., device=cuda) of the
# coefficients was a blocking host-to-GPU copy on every op call.
_HOST_SYNC = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.Tensor.item, torch.Tensor.tolist,
              torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.numpy, torch.Tensor.to, torch.Tensor.copy_,
              torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}


class _HostCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_SYNC:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _run_stubbed(monkeypatch, op, *args):
    """Run the Python body of triton_op ``op`` with its kernel launch stubbed: (host calls, launches)."""
    import hvae_fast.kernels.correlated_sample as cs
    import hvae_fast.kernels.gaussian_head as gh

    launches = []

    class _Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.kernel, grid, a, kw))

    for mod in (cs, gh):
        monkeypatch.setattr(mod, "wrap_triton", _Launch)
    with _HostCalls() as mode:
        op._init_fn(*args)
    return mode.calls, launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launchers_copy_nothing_from_the_host(monkeypatch, dtype):
    import hvae_fast.kernels.correlated_sample as cs
    import hvae_fast.kernels.gaussian_head as gh

    z = torch.randn(4, 6, dtype=dtype)
    mr, sr = torch.randn(2, 3, 4, 6, dtype=dtype).unbind(0)
    t, g = torch.randn(4, 6, dtype=dtype), torch.randn(4, dtype=dtype)
    mbar, sbar = torch.randn(4, 6, dtype=dtype), torch.rand(4, 6, dtype=dtype) + 1
    for op, args in ((cs.correlated_samples_fwd, (z, z, z, 0.95, 3, 7, 0)),
                     (cs.correlated_samples_bwd, (torch.randn(3, 4, 6, dtype=dtype), 0.95, 3, 7, 0)),
                     (gh.gaussian_head_fwd, (mr, sr, t, True, 1e-3)),
                     (gh.gaussian_head_bwd, (g, mr, sr, t, mbar, sbar, True, 1e-3, dtype))):
        calls, launches = _run_stubbed(monkeypatch, op, *args)
        assert calls == [], f"{op}: host-to-device copies or syncs per call: {calls}"
        assert len(launches) == 1
        # every tensor the kernel gets is an input or an output the launcher allocated: no scalar tensors
        tensors = [a for a in launches[0][2] if isinstance(a, torch.Tensor)]
        assert all(a.numel() > 1 for a in tensors), f"{op}: a scalar tensor argument"


def test_split_f64_carries_a_double_in_two_float32():
    from hvae_fast.kernels.utils import split_f64

    for x in (0.95, 1.0, 0.0, 1e-3, 0.3122498999199199, 1 - 1e-12):
        hi, lo = split_f64(x)
        assert np.float32(hi) == hi and np.float32(lo) == lo and hi == np.float32(x)
        assert abs((hi + lo) - x) <= 2.0 ** -48 * abs(x)


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


# ----------------------------------------------------------------------------------------------
# Half precision under the CPU interpreter: the kernels accumulate in float32
# ----------------------------------------------------------------------------------------------

def _half_sum_error(terms: torch.Tensor, dtype) -> torch.Tensor:
    """|sum_k terms_k accumulated in dtype - the float64 sum|: what a half-precision accumulator loses."""
    acc = torch.zeros_like(terms[0], dtype=dtype)
    for t in terms:
        acc = acc + t.to(dtype)
    return (acc.double() - terms.double().sum(0)).abs()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CUDA half-precision tests above run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32_under_the_interpreter(dtype):
    K, shape, rho, seed = 64, (2, 64), 0.3, 5
    # Op 2: sigma_bar and mu_bar are means of K = 64 terms; the output is float32. Against the
    # float64 reference on the same rounded inputs: rtol 1e-5 (float32 arithmetic only), while a
    # dtype accumulator misses the sum of sigma by more (checked below, so the test can fail).
    m, s, t = _head_inputs(K, shape, 4, extreme=False, dtype=dtype)
    for mode in ("mean-std", "ratio"):
        out = gaussian_head_logprob(m, s, t, mode=mode)
        assert out.dtype == torch.float32
        ref = gaussian_head_reference(m.double(), s.double(), t.double(), mode=mode)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    sig = torch.nn.functional.softplus(s.double()) + 1e-3
    assert (_half_sum_error(sig, dtype) / sig.sum(0)).max() > 1e-4
    # Op 1 backward: dsigma = c sum_k g_k eps_k over K = 64 samples, rounded once to dtype: within one
    # ulp of dtype of the float64 sum (the interpreter's conversion may truncate), which a running
    # sum in dtype is not.
    z, mu, sigma = (x.to(dtype).requires_grad_(True) for x in _inputs(shape, 2))
    out = correlated_samples(z, mu, sigma, rho, K, seed)
    assert out.dtype == dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    out.backward(g)
    eps = correlated_noise(seed, K, shape, DEVICE).double()
    c = (1 - rho * rho) ** 0.5
    want = c * (g.double() * eps).sum(0)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one ulp, relative
    err = (sigma.grad.double() - want).abs()
    assert (err <= ulp * want.abs() + 1e-6).all(), err.max()
    assert (_half_sum_error(c * g.double() * eps, dtype) > ulp * want.abs() + 1e-6).any()
    # Op 1 forward: a z + b mu + c sigma eps in float32, rounded once to dtype
    want = (rho * z.float() + (1 - rho) * mu.float() + c * sigma.float() * eps.float()).to(dtype)
    torch.testing.assert_close(out.detach().float(), want.float(), rtol=ulp, atol=1e-6)
