"""One test suite for every OU backend ``hvae_fast.ops.ou`` knows, against ONE float64 reference.

Each test runs once per (backend, device) case: torch (CPU, and CUDA where present), cpp (CPU),
triton (CUDA, else the CPU interpreter: TRITON_INTERPRET=1 is set below before the kernels are
imported), cuda (CUDA). An unavailable backend skips with its probe's reason, except cpp under
HVAE_REQUIRE_CPP=1 (CI) and cuda under HVAE_REQUIRE_CUDA=1 (gpucheck on a GPU), where it fails. The reference is ``correlated_samples_reference`` /
``gaussian_head_reference`` in float64, fed the backend's own noise (``correlated_noise``).
What only one backend has (Philox known answers, C++/Triton bit compatibility, the nvcc compile
test, 64-bit offsets, half precision on CUDA) stays in tests/test_native.py and
tests/test_kernels_triton.py. The Triton interpreter is slow: sizes stay small.

Tolerances (``assert_close_to_ref``):
* float64: rtol 1e-9 against the float64 reference.
* float32: elementwise at most 4x PyTorch's own float32 evaluation of the reference, plus rtol 1e-4
  (meaningful where gradients span many orders of magnitude, |scale_raw| = 30, or cancel).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():  # before any Triton kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

from hvae_fast.ops import ou  # noqa: E402
from hvae_fast.ops.backends import required  # noqa: E402
from hvae_fast.errors import HVAEError  # noqa: E402
from hvae_fast.ops.ou import correlated_samples_reference, gaussian_head_reference  # noqa: E402

CUDA = torch.cuda.is_available()
CASES = [("torch", "cpu")] + ([("torch", "cuda")] if CUDA else []) + [
    ("cpp", "cpu"), ("triton", "cuda" if CUDA else "cpu"), ("cuda", "cuda")]
# MLP and conv shapes; 91 and 735 elements are no multiple of any block size, 4000 and 4096 span
# several blocks / chunks.
SHAPES = {"mlp100x40": (100, 40), "mlp7x13": (7, 13), "conv2x8x16x16": (2, 8, 16, 16), "conv3x5x7x7": (3, 5, 7, 7)}
KS = [1, 5, 10]
RHOS = [0.0, 0.5, 0.95, 1.0]
DTYPES = [torch.float32, torch.float64]
# Which parameter combinations each case runs. Every case runs a Latin square (every K with every
# shape and with every rho / head variant, for each dtype). On top of it: the fast cases (cpp,
# anything on CUDA) run the full product for K in {1, 10}; the Triton interpreter (slow) runs its
# former float32 grid (op 1: K in {1, 10}; op 2: every K, with the softplus tails) and the Latin
# square only in float64 on the MLP shapes; the torch backend on CPU is the reference itself.
FULL = "full"
GRID = {("torch", "cpu"): "latin", ("triton", "cpu"): "interpreter"}


def _keep(kind, latin, shape, K, variant, dtype):
    if kind == FULL:
        return latin or K != 5
    if kind == "latin":
        return latin
    if dtype == torch.float64:  # the interpreter
        return latin and len(shape) == 2
    return variant[1] if isinstance(variant, tuple) else K != 5


def _grid(variants, label):
    """pytest params (case, shape, K, variant, dtype) of every case; variants: rho values or head variants."""
    out = []
    for case in CASES:
        kind = GRID.get(case, FULL)
        for i, (sid, shape) in enumerate(SHAPES.items()):
            for j, v in enumerate(variants):
                for K in KS:
                    for dt, dn in zip(DTYPES, ("f32", "f64")):
                        if _keep(kind, K == KS[(i + j) % 3], shape, K, v, dt):
                            out.append(pytest.param(case, shape, K, v, dt,
                                                    id=f"{case[0]}-{case[1]}-{sid}-K{K}-{label(v)}-{dn}"))
    return out


CORR_GRID = _grid(RHOS, lambda rho: f"rho{rho}")
HEAD_GRID = _grid([(m, lg) for m in ("mean-std", "ratio") for lg in (False, True)],
                  lambda v: f"{v[0]}-{'scale30' if v[1] else 'normal'}")
F64_IN_F32 = {"cuda"}  # backends that compute float64 inputs in float32


@functools.lru_cache(maxsize=None)
def _status(device: str) -> dict:
    return ou.backend_status(device)


@dataclass(frozen=True)
class Case:
    b: ou.Backend
    device: torch.device

    @property
    def name(self) -> str:
        return self.b.name

    def noise(self, seed, K, shape, dtype=torch.float32):
        """The eps the backend uses: float32 for the fused ones; the torch backend draws in the op's dtype."""
        if self.name == "torch":
            return self.b.correlated_noise(seed, K, shape, self.device, dtype=dtype)
        return self.b.correlated_noise(seed, K, shape, self.device)

    @property
    def interpreted(self) -> bool:
        """Triton on the CPU interpreter: correct but slow, so it gets smaller sizes."""
        return self.name == "triton" and self.device.type == "cpu"

    def need_f64(self, dtype):
        if dtype == torch.float64 and self.name in F64_IN_F32:
            pytest.skip(f"the {self.name} backend computes float64 inputs in float32")


@pytest.fixture(params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def case(request) -> Case:
    name, device = request.param
    ok, why = _status(device)[name]
    if not ok:
        if name in ("cpp", "cuda") and required(name):
            pytest.fail(f"{name} backend unavailable with HVAE_REQUIRE_{name.upper()}=1: {why}")
        pytest.skip(f"{name} backend unavailable on {device}: {why}")
    return Case(ou.BACKENDS[name], torch.device(device))


def test_suite_covers_every_backend():
    # Every name the registry knows (except "auto") has a case here.
    assert {n for n, _ in CASES} == set(ou.BACKEND_NAMES) - {"auto"}
    ou.backend_status("cpu")  # registers the fused backends
    assert set(ou.BACKENDS) == {n for n, _ in CASES}


def assert_close_to_ref(ours, ref64, ref32=None, dtype=torch.float64, what=""):
    """float64: rtol 1e-9, atol 1e-12 * max|ref|.
    float32: elementwise |ours - ref64| <= 4 |torch_fp32 - ref64| + 1e-4 |ref64| + 1e-6 * mean|ref64|."""
    ours = ours.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert ours.shape == ref64.shape, what
    assert torch.isfinite(ours).all(), what
    if dtype == torch.float64:
        torch.testing.assert_close(ours, ref64, rtol=1e-9, atol=1e-12 * float(ref64.abs().max()) + 1e-300,
                                   msg=lambda m: f"{what}: {m}")
        return
    base = (ref32.detach().double().cpu() - ref64).abs()
    tol = 4 * base + 1e-4 * ref64.abs() + 1e-6 * float(ref64.abs().mean())
    err = (ours - ref64).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst err "
                           f"{float(err.max()):.3g}, ref there {float(ref64.flatten()[int((err - tol).argmax())]):.3g}")


def strided(x: torch.Tensor) -> torch.Tensor:
    """Same values as x, as a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def transposed(x: torch.Tensor) -> torch.Tensor:
    """Same values as x (dim >= 2), laid out with its last two dimensions swapped."""
    out = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or x.shape[-1] == 1 or x.shape[-2] == 1
    return out


def model_halves(mean_raw: torch.Tensor, scale_raw: torch.Tensor):
    """mean_raw, scale_raw [K, B, C, ...] as the model hands them to the head: the two channel halves
    of one [K, B, 2C, ...] generator output (model.py: ``out.chunk(2, dim=2)``), non-contiguous views."""
    m, s = torch.cat([mean_raw, scale_raw], dim=2).chunk(2, dim=2)
    assert not m.is_contiguous() and not s.is_contiguous() and m.data_ptr() != s.data_ptr()
    return m, s


def _grads_of(fn, inputs, upstream):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), [x.grad for x in leaves]


# ----------------------------------------------------------------------------------------------
# Op 1: correlated samples
# ----------------------------------------------------------------------------------------------

def _posterior(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.nn.functional.softplus(torch.randn(shape, generator=g, dtype=torch.float64)) + 0.05
    return tuple(t.to(device, dtype) for t in (z, mu, sigma))


@pytest.mark.parametrize("case, shape, K, rho, dtype", CORR_GRID, indirect=["case"])
def test_correlated_samples_matches_reference(case, shape, K, rho, dtype):
    # Forward and all three gradients; z strided and mu transposed (non-contiguous views).
    case.need_f64(dtype)
    seed = 1234 + K
    z, mu, sigma = _posterior(shape, dtype, case.device)
    eps = case.noise(seed, K, shape, dtype)
    assert eps.shape == (K, *shape)
    up = torch.randn((K, *shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(case.device)
    ours, ours_g = _grads_of(
        lambda z_, mu_, s_: case.b.correlated_samples(strided(z_), transposed(mu_), s_, rho, K, seed),
        (z, mu, sigma), up)
    assert ours.dtype == dtype and ours.shape == (K, *shape)
    ref_fn = lambda e: (lambda z_, mu_, s_: correlated_samples_reference(z_, mu_, s_, rho, e))  # noqa: E731
    ref, ref_g = _grads_of(ref_fn(eps.double()), (z.double(), mu.double(), sigma.double()), up)
    ref32, ref32_g = _grads_of(ref_fn(eps.float()), (z.float(), mu.float(), sigma.float()), up)
    assert_close_to_ref(ours, ref, ref32, dtype, "forward")
    for name, a, b, c in zip(("dz", "dmu", "dsigma"), ours_g, ref_g, ref32_g):
        assert a.dtype == dtype and a.shape == shape
        assert_close_to_ref(a, b, c, dtype, name)


def test_rho_one_is_identity(case):
    # Exact: rho = 1 gives z' = z (coefficients 1, 0, 0), dz = K, dmu = dsigma = 0.
    z, mu, sigma = (t.requires_grad_(True) for t in _posterior((5, 6), torch.float32, case.device))
    out = case.b.correlated_samples(z, mu, sigma, 1.0, 4, 17)
    assert torch.equal(out, z.detach().expand(4, 5, 6))
    out.sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 4.0))
    for g in (mu.grad, sigma.grad):
        assert g is None or torch.equal(g, torch.zeros_like(g))


def test_rho_zero_forgets_z_and_averages_to_mu(case):
    # rho = 0: z' does not depend on z, and mean_k z'_k -> mu at rate 1/sqrt(K): over N = 2000
    # elements the RMS of sqrt(K) (mean_k z'_k - mu) / sigma is 1 up to ~1.6% (std), bound [0.9, 1.1];
    # its mean lies within 6 / sqrt(K N).
    K = 16
    z, mu, sigma = _posterior((50, 40), torch.float32, case.device, seed=4)
    out0 = case.b.correlated_samples(z, mu, sigma, 0.0, K, 23)
    assert torch.equal(out0, case.b.correlated_samples(z + 5.0, mu, sigma, 0.0, K, 23))
    dev = (out0.mean(0) - mu) / sigma
    assert 0.9 < dev.pow(2).mean().sqrt().item() * math.sqrt(K) < 1.1
    assert abs(dev.mean().item()) < 6.0 / math.sqrt(K * z.numel())


def test_noncontiguous_equals_contiguous(case):
    # Exact: the memory layout of the inputs must not change the result.
    z, mu, sigma = _posterior((4, 8, 6, 6), torch.float32, case.device)
    zt = z.transpose(2, 3).contiguous().transpose(2, 3)
    assert not zt.is_contiguous()
    assert torch.equal(case.b.correlated_samples(zt, mu, strided(sigma), 0.7, 5, 3),
                       case.b.correlated_samples(z, mu, sigma, 0.7, 5, 3))


@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_empty_batch(case, mode):
    # A zero-sized batch (B = 0; and B > 0 with empty rows): empty outputs and gradients, no error
    # (the CUDA head threw on B = 0: issue 19, defect 8).
    for B, C in ((0, 6), (3, 0)):
        z, mu, sigma = (torch.zeros(B, C, device=case.device, requires_grad=True) for _ in range(3))
        out = case.b.correlated_samples(z, mu, sigma + 1, 0.5, 3, 5)
        assert out.shape == (3, B, C)
        assert all(g.shape == (B, C) for g in torch.autograd.grad(out.sum(), (z, mu, sigma)))
        wide = torch.zeros(3, B, 2 * C, device=case.device, requires_grad=True)
        t = torch.zeros(B, C, device=case.device, requires_grad=True)
        lp = case.b.gaussian_head_logprob(*wide.chunk(2, dim=2), t, mode, 1e-3)
        assert lp.shape == (B,) and torch.equal(lp, torch.zeros_like(lp))
        gw, gt = torch.autograd.grad(lp.sum(), (wide, t), allow_unused=True)
        assert (gw is None or gw.shape == wide.shape) and (gt is None or gt.shape == t.shape)


def test_argument_validation(case):
    z, mu, sigma = _posterior((2, 3), torch.float32, case.device)
    for rho in (-0.1, 1.5, float("nan")):
        with pytest.raises(HVAEError, match="rho"):
            case.b.correlated_samples(z, mu, sigma, rho, 2, 0)
    for K in (0, -1, 2.5):
        with pytest.raises(HVAEError, match="K"):
            case.b.correlated_samples(z, mu, sigma, 0.5, K, 0)
    mr = torch.zeros(2, 2, 3, device=case.device)
    with pytest.raises(HVAEError, match="unknown OU target"):
        case.b.gaussian_head_logprob(mr, mr, torch.zeros(2, 3, device=case.device), "nope", 1e-3)
    if case.name != "torch":  # the reference leaves shape errors to torch's own RuntimeError
        with pytest.raises(HVAEError, match="shape"):
            case.b.gaussian_head_logprob(mr, mr, torch.zeros(2, 4, device=case.device), "mean-std", 1e-3)


# ----------------------------------------------------------------------------------------------
# Op 2: averaged Gaussian head
# ----------------------------------------------------------------------------------------------

def _head_inputs(shape, K, dtype, device, large):
    g = torch.Generator().manual_seed(42)
    mean_raw = torch.randn((K, *shape), generator=g, dtype=torch.float64)
    scale_raw = torch.randn((K, *shape), generator=g, dtype=torch.float64) * 2
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    if large:  # far into both tails of the softplus (threshold 20): sigma = 30 and sigma = min_scale
        flat = scale_raw.view(K, -1)
        flat[:, ::5] = 30.0
        flat[:, 2::5] = -30.0
        flat[:, 4::10] = 25.0
    return tuple(t.to(device, dtype) for t in (mean_raw, scale_raw, target))


@pytest.mark.parametrize("case, shape, K, variant, dtype", HEAD_GRID, indirect=["case"])
def test_gaussian_head_matches_reference(case, shape, K, variant, dtype):
    # Log-density and all three gradients on the model's inputs: mean_raw and scale_raw the two
    # channel halves of one [K, B, 2C, ...] tensor, target transposed (all non-contiguous).
    case.need_f64(dtype)
    mode, large = variant
    min_scale = 1e-3
    inputs = _head_inputs(shape, K, dtype, case.device, large)
    up = torch.randn(shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(case.device)
    ours, ours_g = _grads_of(
        lambda m, s, t: case.b.gaussian_head_logprob(*model_halves(m, s), transposed(t), mode, min_scale), inputs, up)
    assert ours.shape == (shape[0],) and ours.dtype == dtype
    ref_fn = lambda m, s, t: gaussian_head_reference(m, s, t, mode, min_scale)  # noqa: E731
    ref, ref_g = _grads_of(ref_fn, [x.double() for x in inputs], up)
    ref32, ref32_g = _grads_of(ref_fn, [x.float() for x in inputs], up)
    assert_close_to_ref(ours, ref, ref32, dtype, "logprob")
    for name, a, b, c in zip(("d mean_raw", "d scale_raw", "d target"), ours_g, ref_g, ref32_g):
        assert a.dtype == dtype
        assert_close_to_ref(a, b, c, dtype, name)


@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_gaussian_head_layout_does_not_change_the_result(case, mode):
    # Exact for the fused backends (the per-element arithmetic does not see the layout; torch's own
    # kernels vectorise by layout, so the reference gets float32 rounding): contiguous inputs, the
    # model's channel halves (read in place by the fused kernels), a strided last dim (copied first)
    # and a stride-0 K dim give the same result, forward and backward.
    def same(a, b):
        if case.name == "torch":
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)

    m, s, t = _head_inputs((3, 4, 5, 5), 3, torch.float32, case.device, True)
    up = torch.linspace(0.5, 1.5, 3, device=case.device)
    want = _grads_of(lambda a, b, c: case.b.gaussian_head_logprob(a, b, c, mode, 1e-3), (m, s, t), up)
    for layout in (model_halves, lambda a, b: (strided(a), b), lambda a, b: (a, strided(b))):
        got = _grads_of(lambda a, b, c: case.b.gaussian_head_logprob(*layout(a, b), c, mode, 1e-3), (m, s, t), up)
        same(got[0], want[0])
        for x, y in zip(got[1], want[1]):
            same(x, y)
    m1, s1 = m[:1], s[:1]  # one sample broadcast over K = 3: stride 0 on K, as the reference sees K copies
    got = _grads_of(lambda a, b, c: case.b.gaussian_head_logprob(a.expand(3, -1, -1, -1, -1), b.expand_as(s), c,
                                                                 mode, 1e-3), (m1, s1, t), up)
    want = _grads_of(lambda a, b, c: case.b.gaussian_head_logprob(a.repeat(3, 1, 1, 1, 1), b.repeat(3, 1, 1, 1, 1),
                                                                  c, mode, 1e-3), (m1, s1, t), up)
    torch.testing.assert_close(got[0], want[0])
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y)


def test_gaussian_head_keeps_views_not_copies(case):
    # On the model's channel halves, backward keeps views of the caller's [K, B, 2C, ...] buffer in the
    # ratio mode (it reads both halves) and, in the mean-std mode (it reads scale_raw only), one compact
    # [K, B, C, ...] scale_raw instead of a view that would keep both halves alive; nothing else is K-sized.
    if case.name in ("torch", "cuda"):
        pytest.skip(f"the {case.name} backend's autograd graph is torch's own / tested on CUDA machines")
    K, shape = 3, (4, 2, 3, 3)
    m, s, t = _head_inputs(shape, K, torch.float32, case.device, False)
    buf = torch.cat([m, s], dim=2).requires_grad_(True)
    storage = buf.untyped_storage().data_ptr()
    for mode in ("ratio", "mean-std"):
        out = case.b.gaussian_head_logprob(*buf.chunk(2, dim=2), t, mode, 1e-3)
        saved = [x for x in out.grad_fn.saved_tensors if x is not None]
        big = [x for x in saved if x.dim() == len(shape) + 1]
        assert all(x.shape == shape for x in saved if x.dim() != len(shape) + 1)
        if mode == "ratio":
            assert len(big) == 2 and all(x.untyped_storage().data_ptr() == storage for x in big)
        else:
            assert len(big) == 1 and big[0].is_contiguous() and big[0].untyped_storage().data_ptr() != storage
            assert torch.equal(big[0], s)
        out.sum().backward()  # and the saved tensors give the reference's gradient
        ref = torch.cat([m, s], dim=2).requires_grad_(True)
        gaussian_head_reference(*ref.chunk(2, dim=2), t, mode, 1e-3).sum().backward()
        torch.testing.assert_close(buf.grad, ref.grad, rtol=1e-4, atol=1e-5)
        buf.grad = None


# ----------------------------------------------------------------------------------------------
# gradcheck (float64, finite differences)
# ----------------------------------------------------------------------------------------------

def test_gradcheck_correlated_samples(case):
    # torch.autograd.gradcheck defaults: eps 1e-6, atol 1e-5, rtol 1e-3 (float64).
    case.need_f64(torch.float64)
    # The Triton interpreter (slow) checks one rho where all three gradients are non-trivial; every
    # rho is also checked in float64 against the reference's autograd above.
    slow = case.interpreted
    z, mu, sigma = (x.requires_grad_(True) for x in _posterior((2, 3) if slow else (3, 4), torch.float64, case.device))
    for rho in (0.6,) if slow else (0.0, 0.6, 1.0):
        assert torch.autograd.gradcheck(lambda a, b, c: case.b.correlated_samples(a, b, c, rho, 2, 5), (z, mu, sigma))


@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_gradcheck_gaussian_head(case, mode):
    # torch.autograd.gradcheck defaults: eps 1e-6, atol 1e-5, rtol 1e-3 (float64).
    case.need_f64(torch.float64)
    shape, K = ((2, 3), 2) if case.interpreted else ((2, 3, 2), 3)
    m, s, t = (x.requires_grad_(True) for x in _head_inputs(shape, K, torch.float64, case.device, False))
    assert torch.autograd.gradcheck(lambda a, b, c: case.b.gaussian_head_logprob(a, b, c, mode, 0.05), (m, s, t))


# ----------------------------------------------------------------------------------------------
# The noise
# ----------------------------------------------------------------------------------------------

def test_noise_statistics(case):
    # 8 x 131072 ~ 1.05e6 draws, fixed seed. Std errors ~1e-3 (mean, correlations), 1.4e-3 (variance);
    # bounds |mean| < 0.005, |var - 1| < 0.01, lag-1 correlation across k, neighbouring elements and
    # neighbouring rows |r| < 0.005; |eps| < 7.
    eps = case.noise(2024, 8, (512, 256)).double().cpu()
    assert eps.shape == (8, 512, 256)
    assert abs(float(eps.mean())) < 0.005
    assert abs(float(eps.var()) - 1.0) < 0.01

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert abs(corr(eps[:-1], eps[1:])) < 0.005
    assert abs(corr(eps[..., :-1], eps[..., 1:])) < 0.005
    assert abs(corr(eps[:, :-1], eps[:, 1:])) < 0.005
    assert float(eps.abs().max()) < 7.0


def test_noise_is_deterministic_and_is_what_the_op_uses(case):
    # Exact: a seed fixes the noise; rho = 0, mu = 0, sigma = 1 gives z'_k = eps_k bit for bit;
    # the [K, *S] noise is one flat stream (row k continues where row k - 1 ended).
    a = case.noise(5, 3, (4, 6))
    assert torch.equal(a, case.noise(5, 3, (4, 6)))
    assert (a != case.noise(6, 3, (4, 6))).float().mean().item() > 0.99
    zero = torch.zeros(4, 6, device=case.device)
    ones = torch.ones(4, 6, device=case.device)
    assert torch.equal(case.b.correlated_samples(zero, zero, ones, 0.0, 3, 5), a)
    assert not torch.equal(case.b.correlated_samples(zero, zero, ones, 0.0, 3, 6), a)
    assert torch.equal(case.noise(7, 3, (4, 5)).flatten(), case.noise(7, 1, (60,)).flatten())
