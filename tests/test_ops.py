"""The OU ops as torch.library operators: torch.library.opcheck on every op of every CPU backend
(schema, autograd registration, fake kernel, AOT dispatch), and the one seed policy and offset
limit of hvae_fast/ops/backends.py that every backend applies."""

import pytest
import torch
from torch.library import opcheck

from hvae_fast.ops.backends import MAX_PHILOX_OFFSET, check_offsets, check_seed
from hvae_fast.errors import HVAEError
from hvae_fast.ops.ou import BACKENDS, backend_status

STATUS = backend_status("cpu")
needs_cpp = pytest.mark.skipif(not STATUS["cpp"][0], reason=f"cpp backend unavailable: {STATUS['cpp'][1]}")
needs_triton = pytest.mark.skipif(not STATUS["triton"][0], reason=f"triton unavailable: {STATUS['triton'][1]}")
# Under TRITON_INTERPRET=1, AOT dispatch traces through triton_op into the interpreter, which then runs
# the kernel on functional (data-less) tensors; compiled Triton (a GPU) emits a graph node instead.
TRITON_CPU_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _cs_args(dtype, offset_base=0):
    g = torch.Generator().manual_seed(0)
    z, mu = (torch.randn(3, 5, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    sigma = (torch.rand(3, 5, generator=g, dtype=dtype) + 0.1).requires_grad_(True)
    return z, mu, sigma, 0.6, 4, 1234, offset_base


def _head_args(dtype, halves=False):
    """mean_raw, scale_raw [4, 3, 5] (contiguous, or with ``halves`` the model's non-contiguous channel
    halves of one [4, 3, 10] tensor, which the fused ops read in place), target [3, 5]."""
    g = torch.Generator().manual_seed(1)
    if halves:
        mr, sr = (x.detach().requires_grad_(True) for x in torch.randn(4, 3, 10, generator=g, dtype=dtype).chunk(2, 2))
        assert not mr.is_contiguous()
    else:
        mr, sr = (torch.randn(4, 3, 5, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    return mr, sr, torch.randn(3, 5, generator=g, dtype=dtype, requires_grad=True)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_ops_pass_opcheck(dtype):
    ops = torch.ops.hvae_fast
    opcheck(ops.correlated_samples_fwd.default, _cs_args(dtype, offset_base=2**33 + 5))
    opcheck(ops.correlated_samples_bwd.default, (torch.randn(4, 3, 5, dtype=dtype), 0.6, 4, 1234, 0, True))
    for ratio, halves in ((False, False), (True, False), (False, True), (True, True)):
        mr, sr, t = _head_args(dtype, halves)
        opcheck(ops.gaussian_head_fwd.default, (mr, sr, t, ratio, 1e-3))
        _, mbar, sbar = ops.gaussian_head_fwd(mr.detach(), sr.detach(), t.detach(), ratio, 1e-3)
        opcheck(ops.gaussian_head_bwd.default, (torch.randn(3, dtype=dtype), mr.detach(), sr.detach(), t.detach(),
                                                mbar, sbar, ratio, 1e-3))


@needs_triton
def test_triton_ops_pass_opcheck_under_the_interpreter():
    from hvae_fast.kernels import correlated_sample as cs, gaussian_head as gh

    opcheck(cs.correlated_samples_fwd, _cs_args(torch.float32, offset_base=2**33 + 5), test_utils=TRITON_CPU_UTILS)
    opcheck(cs.correlated_samples_bwd, (torch.randn(4, 3, 5), 0.6, 4, 1234, 0), test_utils=TRITON_CPU_UTILS)
    for ratio, halves in ((False, False), (True, True)):
        mr, sr, t = _head_args(torch.float32, halves)
        opcheck(gh.gaussian_head_fwd, (mr, sr, t, ratio, 1e-3), test_utils=TRITON_CPU_UTILS)
        _, mbar, sbar = gh.gaussian_head_fwd(mr.detach(), sr.detach(), t.detach(), ratio, 1e-3)
        opcheck(gh.gaussian_head_bwd, (torch.randn(3), mr.detach(), sr.detach(), t.detach(), mbar, sbar, ratio, 1e-3,
                                       torch.float32), test_utils=TRITON_CPU_UTILS)


def test_torch_reference_op_passes_opcheck_and_gradcheck():
    from hvae_fast.ops import ou

    z, mu, sigma, rho, K, seed, _ = _cs_args(torch.float64)
    opcheck(ou._ref_correlated_samples, (z, mu, sigma, rho, K, seed))
    opcheck(ou._ref_correlated_samples_bwd, (torch.randn(K, 3, 5, dtype=torch.float64), rho, K, seed, torch.float64))
    # its hand-written gradient against finite differences (the noise is fixed by the seed)
    assert torch.autograd.gradcheck(lambda a, b, c: BACKENDS["torch"].correlated_samples(a, b, c, rho, K, seed),
                                    (z, mu, sigma))
    # and the forward is the reference formula on the backend's documented noise
    eps = ou.torch_correlated_noise(seed, K, z.shape, dtype=z.dtype)
    torch.testing.assert_close(BACKENDS["torch"].correlated_samples(z, mu, sigma, rho, K, seed),
                               ou.correlated_samples_reference(z, mu, sigma, rho, eps), rtol=0, atol=0)


def test_seed_policy_and_offset_limit():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1 and check_seed(torch.tensor(7)) == 7
    for bad in (-1, 2**63, 1.5, "x", True):
        with pytest.raises(HVAEError, match="seed"):
            check_seed(bad)
    check_offsets(2**31, 2**31 - 1)
    check_offsets(1, 10, MAX_PHILOX_OFFSET - 11)
    for K, n, base in ((2**31, 2**31, 0), (1, 10, MAX_PHILOX_OFFSET - 10)):
        with pytest.raises(HVAEError, match="2\\*\\*62"):
            check_offsets(K, n, base)
    with pytest.raises(HVAEError, match="offset_base"):
        check_offsets(1, 1, -1)


@pytest.mark.parametrize("name", [n for n in ("torch", "cpp", "triton") if STATUS[n][0]])
def test_every_backend_applies_the_seed_policy(name):
    b = BACKENDS[name]
    z = torch.zeros(2, 3)
    b.correlated_samples(z, z, z + 1, 0.5, 2, 2**63 - 1)  # the largest seed is accepted
    for bad in (-5, 2**63):
        with pytest.raises(HVAEError, match="seed"):
            b.correlated_samples(z, z, z + 1, 0.5, 2, bad)
