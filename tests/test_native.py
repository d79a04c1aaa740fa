"""What only the C++ (CPU) OU backend has (the CUDA source's nvcc compile: tests/test_kernels_aot.py).

The forward / gradient / gradcheck / noise-statistics grids of every backend, this one included,
are in tests/test_backends.py. Here: Philox known answers, the vectorised float32 math and noise
against independent models, bit compatibility with Triton's tl.randn, 64-bit offsets, the
build machinery (ISA-keyed cache, failed builds reported),
the production / test-only extension split, the OpenMP paths above each parallel threshold, and the
64-bit offsets of the forward and backward kernels (C++ and Triton) through offset_base.

The whole module is skipped only when the cpp backend cannot be built here AND HVAE_REQUIRE_CPP is
not "1" (CI sets it, so a broken build fails CI instead of vanishing). The first run compiles the
extensions (cached in $HVAE_BUILD_DIR or the user cache directory); later runs reuse them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hvae_fast.ops import native
from hvae_fast.errors import HVAEError

CPP = {b.name: b for b in native.BACKENDS}["cpp"]
_OK, _WHY = CPP.probe(torch.device("cpu"))
if not _OK and os.environ.get("HVAE_REQUIRE_CPP") != "1":
    pytest.skip(f"cpp OU backend unavailable here ({_WHY}); set HVAE_REQUIRE_CPP=1 to make this an error",
                allow_module_level=True)

TEST_ONLY = ("noise_range", "randn_at", "philox_raw", "vm_eval")


def test_cpp_backend_builds():
    # With HVAE_REQUIRE_CPP=1 a failed build lands here with the compiler's reason.
    assert _OK, _WHY


def _ext():
    """The test-only extension (csrc/ou_cpu_testing.cpp): raw Philox, randn at any offset, vm math."""
    mod = native.CPU_TEST_EXT.get()
    assert mod is not None, native.CPU_TEST_EXT.reason
    return mod


def test_test_only_functions_live_in_their_own_extension():
    # The production module carries the ops only; the test module the test entry points, built from
    # the same kernels source with the same flags (same ISA).
    prod = native.CPU_EXT.get()
    assert not [f for f in TEST_ONLY if hasattr(prod, f)]
    assert all(hasattr(_ext(), f) for f in TEST_ONLY)
    assert _ext().isa() == prod.isa()
    assert "ou_cpu_kernels.cpp" in native.CPU_EXT.sources and "ou_cpu_kernels.cpp" in native.CPU_TEST_EXT.sources


# ----------------------------------------------------------------------------------------------
# Op 1: correlated samples
# ----------------------------------------------------------------------------------------------

def _posterior(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.nn.functional.softplus(torch.randn(shape, generator=g, dtype=torch.float64)) + 0.05
    return z.to(dtype), mu.to(dtype), sigma.to(dtype)


def test_correlated_samples_only_some_grads_and_broadcast():
    # Tolerance: exact equality (same kernels, only the set of requested gradients differs).
    z, mu, sigma = _posterior((6, 5), torch.float32)
    sig = sigma.clone().requires_grad_(True)
    out = CPP.correlated_samples(z, mu, sig, 0.5, 3, 11)
    out.sum().backward()
    sig2 = sigma.clone().requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    CPP.correlated_samples(zz, mu, sig2, 0.5, 3, 11).sum().backward()
    assert torch.equal(sig.grad, sig2.grad)
    # mu broadcast over the batch: the gradient is summed by autograd over the expanded rows
    mu_row = mu[:1].clone().requires_grad_(True)
    CPP.correlated_samples(z, mu_row, sigma, 0.5, 3, 11).sum().backward()
    assert mu_row.grad.shape == (1, 5)
    torch.testing.assert_close(mu_row.grad, torch.full((1, 5), 0.5 * 3 * 6), rtol=1e-6, atol=1e-5)


def test_correlated_samples_seeds():
    # Exact: same seed -> bit-identical output; other seeds differ; seeds outside [0, 2**63) are refused.
    z, mu, sigma = _posterior((8, 16), torch.float32)
    a = CPP.correlated_samples(z, mu, sigma, 0.3, 4, 99)
    b = CPP.correlated_samples(z, mu, sigma, 0.3, 4, 99)
    c = CPP.correlated_samples(z, mu, sigma, 0.3, 4, 100)
    d = CPP.correlated_samples(z, mu, sigma, 0.3, 4, 2**40 + 99)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    for bad in (-5, 2**63):
        with pytest.raises(HVAEError, match="seed"):
            CPP.correlated_samples(z, mu, sigma, 0.3, 4, bad)


# ----------------------------------------------------------------------------------------------
# Op 2: averaged Gaussian head
# ----------------------------------------------------------------------------------------------

def _head_inputs(shape, K, dtype, large):
    g = torch.Generator().manual_seed(42)
    mean_raw = torch.randn((K, *shape), generator=g, dtype=torch.float64)
    scale_raw = torch.randn((K, *shape), generator=g, dtype=torch.float64) * 2
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    if large:  # far into both tails of the softplus: sigma = 30 and sigma = min_scale
        flat = scale_raw.view(K, -1)
        flat[:, ::5] = 30.0
        flat[:, 2::5] = -30.0
    return mean_raw.to(dtype), scale_raw.to(dtype), target.to(dtype)


def test_gaussian_head_saves_no_k_sized_tensors():
    # Exact: on contiguous inputs the autograd graph keeps the inputs and [B, *S] averages only (the
    # model's strided halves: tests/test_backends.py::test_gaussian_head_keeps_views_not_copies).
    K, shape = 6, (4, 5)
    m, s, t = (x.requires_grad_(True) for x in _head_inputs(shape, K, torch.float32, False))
    for mode in ("ratio", "mean-std"):
        out = CPP.gaussian_head_logprob(m, s, t, mode, 1e-3)
        saved = [x for x in out.grad_fn.saved_tensors if x is not None]
        extra = [x for x in saved if not any(x.data_ptr() == y.data_ptr() for y in (m, s, t))]
        assert all(tuple(x.shape) == shape for x in extra), [tuple(x.shape) for x in extra]
        # mean-std: d mean_raw_k = dm / K never reads mean_raw, so it is not kept
        assert any(x.data_ptr() == m.data_ptr() for x in saved) == (mode == "ratio")


# ----------------------------------------------------------------------------------------------
# The noise: statistics, Philox correctness, Triton compatibility, 64-bit offsets
# ----------------------------------------------------------------------------------------------

_M = np.uint64(0xFFFFFFFF)


def _philox_numpy(c, k):
    """Philox4x32-10 (Salmon et al. 2011), written independently with numpy uint64 arithmetic."""
    c = [np.uint64(x) for x in c]
    k0, k1 = np.uint64(k[0]), np.uint64(k[1])
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0 = M0 * c[0]  # full 64-bit products of 32-bit values
        p1 = M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _M
        hi1, lo1 = p1 >> np.uint64(32), p1 & _M
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + W0) & _M, (k1 + W1) & _M
    return [int(x) for x in c]


def test_philox_matches_independent_implementation():
    # Exact uint32 equality, including Random123's published known-answer vectors.
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    rng = np.random.default_rng(0)
    cases = [(c, k) for c, k, _ in kat]
    for _ in range(20):
        cases.append((tuple(int(x) for x in rng.integers(0, 2**32, 4)), tuple(int(x) for x in rng.integers(0, 2**32, 2))))
    for c, k in cases:
        got = _ext().philox_raw(torch.tensor([c], dtype=torch.int64), k[0], k[1])[0].tolist()
        assert got == _philox_numpy(c, k), (c, k)
    for c, k, want in kat:
        assert _philox_numpy(c, k) == list(want)


def _randn_numpy(seed, offsets):
    """tl.randn(seed, offset) from the numpy Philox: float32 uniform + Box-Muller."""
    out = []
    for off in offsets:
        off &= 2**64 - 1
        r = _philox_numpy((off & 0xFFFFFFFF, off >> 32, 0, 0), (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
        u = []
        for x in r[:2]:
            i = np.int64(x - 2**32 if x >= 2**31 else x)
            i = ~i if i < 0 else i
            u.append(np.float32(i) * np.float32(4.6566127342e-10))
        u1 = max(np.float32(1e-7), u[0])
        out.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * float(u[1])))
    return np.array(out)


OFFSETS = [0, 1, 2, 3, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 - 1]
SEEDS = [1234, 2**40 + 17]


def test_randn_matches_numpy_model():
    # Tolerance: 1e-5 absolute (float32 log/cos versus float64 math on the same uniforms).
    for seed in SEEDS:
        got = _ext().randn_at(seed, torch.tensor(OFFSETS, dtype=torch.int64)).double().numpy()
        np.testing.assert_allclose(got, _randn_numpy(seed, OFFSETS), rtol=0, atol=1e-5)


def test_64bit_offsets_are_not_truncated():
    # Exact: the high 32 bits of the offset are the second counter word, so offset 2**32 + j
    # draws differently from j; and the correlated_noise stream is randn at offset k * N + j.
    low = torch.arange(0, 64, dtype=torch.int64)
    for seed in SEEDS:
        a = _ext().randn_at(seed, low)
        b = _ext().randn_at(seed, low + 2**32)
        c = _ext().randn_at(seed, low + 2**33)
        assert not torch.isclose(a, b).any() and not torch.isclose(b, c).any()
        flat = CPP.correlated_noise(seed, 4, (16,)).flatten()
        assert torch.equal(flat, a)


# ----------------------------------------------------------------------------------------------
# The float32 approximations of csrc/cpu_vec_math.h (namespace vm) against float64 torch
# ----------------------------------------------------------------------------------------------

def _vm(x, fn):
    return _ext().vm_eval(x.float(), fn).double()


def test_vm_exp_log_cos_accuracy():
    # Dense grids (2e6 points each); stated bounds, measured maxima in brackets:
    #   exp:  rel 1.5e-7 on [-87, 88] [8.3e-8]; subnormal range [-104, -87]: abs 1.5e-7 |ref| + 1.5e-45
    #         (the spacing of float32 subnormals); 0 below -104, inf above 88.73, NaN -> NaN
    #   log:  rel 1.5e-7 over all positive floats incl. subnormals, away from x = 1; abs 1.5e-7 near 1 [7.8e-8]
    #   cos:  abs 1.5e-7 on [0, 2 pi] (the Box-Muller angle) [9.2e-8]
    #   softplus and its derivative e / (e + 1): rel 3e-7 on [-40, 25] [1.3e-7, 1.8e-7]
    #   log1p(t), 0 <= t <= 1 (softplus's log1p(exp(-|x|))): rel 3e-7 [1.2e-7]
    x = torch.linspace(-87, 88, 2_000_001)
    ref = torch.exp(x.double())
    assert float(((_vm(x, 0) - ref).abs() / ref).max()) < 1.5e-7
    x = torch.linspace(-104, -87, 200_001)
    ref = torch.exp(x.double())
    assert ((_vm(x, 0) - ref).abs() <= 1.5e-7 * ref + 1.5e-45).all()
    special = _vm(torch.tensor([-200.0, -104.5, 89.0, float("inf"), float("-inf"), float("nan")]), 0)
    assert special[:2].eq(0).all() and special[2:4].eq(math.inf).all() and special[4] == 0 and special[5].isnan()

    x = torch.cat([torch.logspace(-45, 38.5, 2_000_001, dtype=torch.float64).float(), torch.linspace(0.5, 2.0, 1_000_001)])
    x = x[x > 0]
    ref = torch.log(x.double())
    err = (_vm(x, 1) - ref).abs()
    assert float(err.max()) < 1.5e-7 * 32  # |log x| <= 104: no large absolute error anywhere
    assert (err <= 1.5e-7 * ref.abs() + 1.5e-7 * (x.double() - 1).abs()).all()  # relative, incl. near x = 1
    special = _vm(torch.tensor([0.0, -1.0, float("inf"), float("nan")]), 1)
    assert special[0] == -math.inf and special[1].isnan() and special[2] == math.inf and special[3].isnan()

    x = torch.linspace(0, 2 * math.pi, 2_000_001)
    assert float((_vm(x, 2) - torch.cos(x.double())).abs().max()) < 1.5e-7

    x = torch.linspace(-40, 25, 2_000_001)
    sp = torch.nn.functional.softplus(x.double())
    assert float(((_vm(x, 3) - sp).abs() / sp).max()) < 3e-7
    sig = torch.where(x.double() > 20, torch.ones_like(sp), torch.sigmoid(x.double()))
    assert float(((_vm(x, 4) - sig).abs() / sig).max()) < 3e-7
    t = torch.cat([torch.logspace(-40, 0, 1_000_001, dtype=torch.float64).float(), torch.linspace(0, 1, 1_000_001)[1:]])
    ref = torch.log1p(t.double())
    assert float(((_vm(t, 5) - ref).abs() / ref).max()) < 3e-7
    assert _vm(torch.zeros(1), 5).item() == 0.0


def _randn_numpy_vec(seed, offsets):
    """tl.randn for an array of offsets: numpy Philox (uint64 arrays), float32 uniforms and angle,
    float64 log / sqrt / cos."""
    off = np.asarray(offsets, dtype=np.uint64)
    c = [off & _M, off >> np.uint64(32), np.zeros_like(off), np.zeros_like(off)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M]
        k0, k1 = (k0 + W0) & _M, (k1 + W1) & _M
    u = []
    for x in c[:2]:
        i = x.astype(np.uint32).view(np.int32)
        u.append(np.where(i < 0, ~i, i).astype(np.float32) * np.float32(4.6566127342e-10))
    u1 = np.maximum(np.float32(1e-7), u[0])
    th = np.float32(6.283185307179586) * u[1]  # float32 angle, as Triton and the kernels round it
    return np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(th.astype(np.float64))


def test_vectorised_noise_matches_model_over_many_draws():
    # Tolerance: 2e-6 absolute over 2**20 draws (|eps| <= 5.7; polynomial log / cos errors <= 1.5e-7
    # plus the float32 rounding of the result), and the offsets cross 2**32 (the low counter word
    # wraps inside a block, which the kernels split). Measured max: 5.7e-7.
    seed = 2**40 + 17
    start = 2**32 - 2**19 + 3
    ours = _ext().noise_range(seed, start, 2**20)
    ref = _randn_numpy_vec(seed, np.arange(start, start + 2**20, dtype=np.uint64))
    assert np.abs(ours.double().numpy() - ref).max() < 2e-6
    # the arbitrary-offset path (randn_at) draws the same numbers as the block path
    offs = torch.arange(start, start + 2**20, dtype=torch.int64)
    assert torch.equal(_ext().randn_at(seed, offs), ours)
    assert torch.equal(_ext().noise_range(seed, 0, 1000), native.CPU_EXT.get().noise(seed, 1, 1000, 0))


def test_extension_isa_matches_build_choice():
    # The build directory is keyed on the ISA the extension was compiled for.
    isa = native.cpu_isa()
    assert _ext().isa() == {"avx2": "avx2-fma", "baseline": "baseline"}[isa]
    assert native.CPU_EXT.reason.endswith(isa) and f"hvae_fast_ou_cpu-{isa}" in native.CPU_EXT.reason


_TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton, triton.language as tl

    @triton.jit
    def _randn(out_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        off = tl.load(off_ptr + i, mask=m, other=0)
        tl.store(out_ptr + i, tl.randn(seed, off), mask=m)

    offsets, seeds = json.loads(sys.argv[1])
    offs = torch.tensor(offsets, dtype=torch.int64)
    res = {}
    for seed in seeds:
        out = torch.empty(offs.shape, dtype=torch.float32)
        _randn[(1,)](out, offs, seed, offs.numel(), BLOCK=triton.next_power_of_2(offs.numel()))
        res[str(seed)] = out.tolist()
    print("RESULT" + json.dumps(res))
""")


def test_noise_matches_triton_randn():
    # Tolerance: 1e-6 absolute (same Philox integers; libm vs Triton-interpreter float32 log/cos).
    pytest.importorskip("triton")
    arg = json.dumps([OFFSETS, SEEDS])
    if os.environ.get("TRITON_INTERPRET") == "1":
        ns = {}
        exec(compile(_TRITON_SCRIPT.replace("json.loads(sys.argv[1])", repr(json.loads(arg))).replace(
            'print("RESULT" + json.dumps(res))', ""), "<triton-randn>", "exec"), ns)
        res = ns["res"]
    else:
        env = dict(os.environ, TRITON_INTERPRET="1")
        with_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hvae_triton_randn_{os.getpid()}.py")
        with open(with_file, "w") as f:  # triton.jit needs the kernel's source in a real file
            f.write(_TRITON_SCRIPT)
        try:
            p = subprocess.run([sys.executable, with_file, arg], env=env, capture_output=True, text=True, timeout=240)
        finally:
            os.unlink(with_file)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
        if p.returncode != 0 or not lines:
            pytest.skip(f"Triton interpreter unavailable: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        res = json.loads(lines[-1][len("RESULT"):])
    for seed in SEEDS:
        ours = _ext().randn_at(seed, torch.tensor(OFFSETS, dtype=torch.int64))
        torch.testing.assert_close(ours, torch.tensor(res[str(seed)], dtype=torch.float32), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Build machinery: a failed build is reported, not raised
# ----------------------------------------------------------------------------------------------

# The nvcc compile of csrc/ou_cuda_kernels.cu for sm_80 / sm_90 (0 spills): tests/test_kernels_aot.py.


def test_failed_build_is_reported_not_raised(tmp_path, caplog):
    # A fresh loader pointed at a broken source: probe -> (False, reason), one warning, no exception.
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++ {\n")
    ext = native.NativeExtension("hvae_fast_broken_test", ("broken.cpp",), src_dir=src, build_dir=tmp_path / "build")
    with caplog.at_level(logging.WARNING, logger="hvae_fast.ops.native"):
        ok, why = ext.probe()
        assert ext.get() is None  # cached: no second build, no second warning
    assert not ok and "failed" in why and "error" in why.lower(), why
    warnings = [r for r in caplog.records if r.name == "hvae_fast.ops.native" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "hvae_fast_broken_test" in warnings[0].getMessage()

    missing = native.NativeExtension("hvae_fast_missing_test", ("nope.cpp",), src_dir=src, build_dir=tmp_path / "b2")
    ok, why = missing.probe()
    assert not ok and "missing sources" in why


def test_missing_ninja_is_reported_not_raised(tmp_path, monkeypatch):
    # torch's loader raises RuntimeError without ninja; the backend must answer (False, reason).
    from torch.utils import cpp_extension

    def no_ninja(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_ninja)
    ext = native.NativeExtension("hvae_fast_noninja_test", ("ou_cpu.cpp",), build_dir=tmp_path / "b")
    ok, why = ext.probe()
    assert not ok and "Ninja is required" in why


def test_cuda_backend_probe_on_this_machine():
    # Without a CUDA torch/device the cuda backend says why; it never raises.
    cuda = {b.name: b for b in native.BACKENDS}["cuda"]
    ok, why = cuda.probe(torch.device("cuda"))
    if not (torch.version.cuda and torch.cuda.is_available()):
        assert not ok and why
    assert cuda.probe(torch.device("cpu")) == (False, "does not run on cpu")


def test_registry_picks_cpp():
    from hvae_fast.ops import ou

    assert ou.backend_status("cpu")["cpp"][0]
    assert ou.get_backend("cpp", "cpu").name == "cpp"


@pytest.mark.slow
def test_cuda_bindings_syntax(tmp_path):
    # Slow (~1-2 min): g++ -fsyntax-only on csrc/ou_cuda.cpp with torch's headers and the CUDA
    # toolkit's; a CPU-only torch lacks one generated c10/cuda header, stubbed here.
    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        pytest.skip("needs nvcc (CUDA headers) and g++")
    from torch.utils import cpp_extension
    import sysconfig

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))),
             os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    cuda_inc = [os.path.join(r, "include") for r in roots if r and os.path.isfile(os.path.join(r, "include", "cuda_runtime.h"))]
    if not cuda_inc:
        pytest.skip("cuda_runtime.h not found")
    incs = [str(tmp_path)] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"], cuda_inc[0]]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=x"] + [f"-I{i}" for i in incs]
    p = subprocess.run(cmd + [str(native.csrc_dir() / "ou_cuda.cpp")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# The OpenMP paths: sizes above each parallel threshold (csrc/ou_cpu_kernels.cpp: PAR_WORK_NOISE =
# 2**15 normals, PAR_WORK_HEAD = 2**17 head elements x K, in chunks of 512 elements), with more
# threads than parallel chunks and fewer. Each element's arithmetic does not depend on the split, so
# every thread count must give bit-identical results; a race on a shared buffer breaks that.
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


def _all_threads(threads, counts, fn):
    outs = []
    for n in counts:
        threads(n)
        outs.append(fn())
    return outs


# (K, B, S): K=4: head grain = 64 chunks, so 80k elements are 3 parallel tasks (8 threads > tasks)
# and 640k are 20 tasks (2 threads < tasks)
# The inputs are the model's: the two channel halves of one [K, B, 2S] tensor, read in place (a chunk
# gathers its row segments; 20_000 is no multiple of the 512-element chunk, so chunks straddle rows).
@pytest.mark.parametrize("K,B,S", [(4, 4, 20_000), (4, 8, 80_000)])
@pytest.mark.parametrize("mode", ["mean-std", "ratio"])
def test_head_parallel_paths_match_one_thread_and_the_reference(threads, K, B, S, mode):
    from hvae_fast.ops.ou import gaussian_head_reference

    m, s, t = _head_inputs((B, S), K, torch.float64, True)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (m, s, t)]
        halves = torch.cat(leaves[:2], dim=2).chunk(2, dim=2)
        out = CPP.gaussian_head_logprob(*halves, leaves[2], mode, 1e-3)
        out.backward(torch.linspace(0.5, 1.5, B, dtype=torch.float64))
        return [out.detach()] + [x.grad for x in leaves]

    one, many, few = _all_threads(threads, (1, 8, 2), run)
    for a, b, c in zip(one, many, few):
        assert torch.equal(a, b) and torch.equal(a, c)
    leaves = [x.clone().requires_grad_(True) for x in (m, s, t)]
    ref = gaussian_head_reference(*leaves, mode, 1e-3)
    ref.backward(torch.linspace(0.5, 1.5, B, dtype=torch.float64))
    torch.testing.assert_close(one[0], ref.detach(), rtol=1e-10, atol=1e-8)
    for got, want in zip(one[1:], (x.grad for x in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# K=4: noise grain = 16 chunks; 3 * 16 chunks are 3 tasks (8 threads), 40 * 16 are 40 tasks (2 threads)
@pytest.mark.parametrize("N", [3 * 16 * 512 + 100, 40 * 16 * 512])
def test_correlated_samples_parallel_paths_match_one_thread(threads, N):
    z, mu, sigma = _posterior((N,), torch.float32)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (z, mu, sigma)]
        out = CPP.correlated_samples(*leaves, 0.6, 4, 77)
        out.backward(torch.ones_like(out) + out.detach())
        return [out.detach()] + [x.grad for x in leaves]

    one, many, few = _all_threads(threads, (1, 8, 2), run)
    for a, b, c in zip(one, many, few):
        assert torch.equal(a, b) and torch.equal(a, c)
    eps = CPP.correlated_noise(77, 4, (N,))
    torch.testing.assert_close(one[0], 0.6 * z + 0.4 * mu + sigma * 0.8 * eps, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 64-bit offsets of the forward and backward kernels (C++ and Triton), through offset_base, against
# the independent numpy Philox model: the ranges cross 2**32 (the carry into the second counter
# word) and start far above it.
# ----------------------------------------------------------------------------------------------

def _fused(name):
    from hvae_fast.ops.ou import backend_status, get_backend

    ok, why = backend_status("cpu")[name]
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")
    return get_backend(name, "cpu")


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("base", [2**32 - 37, 2**33 + 2**32 + 5, 2**61 + 3])
def test_forward_and_backward_kernels_use_64bit_offsets(name, base):
    # Tolerance 1e-5: float32 Box-Muller against the float64 model on the same Philox integers.
    b, K, N, rho, seed = _fused(name), 3, 24, 0.3, 2**40 + 17
    z, mu, sigma = (x.double().requires_grad_(True) for x in _posterior((4, 6), torch.float32))
    out = b.correlated_samples(z, mu, sigma, rho, K, seed, offset_base=base)
    if name == "triton":  # four normals per Philox counter, ceil(N / 4) counters per row
        from test_kernels_triton import _kernel_noise_reference

        eps = torch.from_numpy(_kernel_noise_reference(seed, K, N, base)).view(K, 4, 6)
    else:
        eps = torch.from_numpy(_randn_numpy(seed, [base + i for i in range(K * N)])).view(K, 4, 6)
    c = math.sqrt(1 - rho * rho)
    torch.testing.assert_close(out.detach(), rho * z + (1 - rho) * mu + c * sigma * eps, rtol=0, atol=1e-5)
    g = torch.randn(K, 4, 6, dtype=torch.float64)
    out.backward(g)
    torch.testing.assert_close(sigma.grad, c * (g * eps).sum(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(b.correlated_noise(seed, K, (4, 6), offset_base=base).double(), eps, rtol=0, atol=1e-5)
    # and offset_base = 0 draws something else (the base is not dropped on the way to the kernel)
    assert not torch.allclose(b.correlated_samples(z, mu, sigma, rho, K, seed), out)
