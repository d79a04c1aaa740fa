"""The contract between ``ou`` and the OU backends: the ``Backend`` record, the backend and OU
target names, the argument checks.

It imports nothing of the package but ``errors`` (and not torch). ``ou`` (which loads and chooses
the backends) and every backend (kernels/backend.py, native.py) import it, so ``ou`` can import
the backends without an import cycle; ``config`` checks its fields against it without reaching
up to ``ou``. Shapes and semantics of the two ops: see ou.py.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import HVAEError

OU_TARGETS = ("mean-std", "ratio")
# Every backend's noise of element (k, j) sits at the Philox offset offset_base + k * N + j, an int64
# in the kernels: 2**62 leaves headroom for that sum to stay positive.
MAX_PHILOX_OFFSET = 2**62
SEED_LIMIT = 2**63  # seeds are integers in [0, 2**63): one int64 for the C++/CUDA schemas and Triton
BACKEND_NAMES = ("auto", "triton", "cuda", "cpp", "torch")  # what --backend accepts


def required(name: str) -> bool:
    """True when HVAE_REQUIRE_<NAME>=1 (CI: cpp; gpucheck on a GPU: cpp and cuda): an unavailable
    backend of that name is then an error in the tests, the benchmarks and ``hvae-fast build``."""
    return os.environ.get(f"HVAE_REQUIRE_{name.upper()}") == "1"


def check_ou_args(rho: float, K: int) -> None:
    """Raise HVAEError for rho outside [0, 1] or K < 1 (the CLI turns it into one line)."""
    if not (isinstance(rho, (int, float)) and 0.0 <= float(rho) <= 1.0) or math.isnan(float(rho)):
        raise HVAEError(f"rho must lie in [0, 1], got {rho!r}: pass --rho between 0 and 1 (1 = no smoothing)")
    if not (isinstance(K, int) and K >= 1):
        raise HVAEError(f"the number of OU samples K must be an integer >= 1, got {K!r}: pass --ou-samples 1 or more")


def check_seed(seed) -> int:
    """The seed policy of every backend: an integer in [0, 2**63), else HVAEError.

    Backends skip it under torch.compile, where the seed is a traced integer drawn in the graph by
    ``OUSmoothing.seed`` from [0, 2**62) whose value exists only at run time."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)  # ints, numpy integers, integer 0-d tensors; not floats
    except TypeError:
        raise HVAEError(f"the OU seed must be an integer, got {seed!r}: pass an int in [0, 2**63)") from None
    if not 0 <= seed < SEED_LIMIT:
        raise HVAEError(f"the OU seed must lie in [0, 2**63), got {seed}: reduce it modulo 2**63")
    return seed


def check_offsets(K: int, n: int, offset_base: int = 0) -> None:
    """The Philox offsets offset_base + k * n + j (k < K, j < n) must stay below MAX_PHILOX_OFFSET."""
    if offset_base < 0:
        raise HVAEError(f"offset_base must be >= 0, got {offset_base}: pass a non-negative noise offset")
    if offset_base + K * n >= MAX_PHILOX_OFFSET:
        raise HVAEError(
            f"K * numel = {K} * {n} (+ offset_base {offset_base}) reaches 2**62 Philox noise offsets: "
            "reduce --ou-samples or --batch-size"
        )


def packed_rows(t) -> bool:
    """True when a [K, B, *S] head input can be read in place by the fused kernels: any strides on K
    and B, the *S dims packed row-major (a channel half of the model's [K, B, 2C, ...] output is)."""
    expected = 1
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def head_saved_inputs(mean_raw, scale_raw, ratio: bool):
    """(mean_raw or None, scale_raw) for the head's backward, without a K x B copy where avoidable.

    ratio: both halves are read, so the caller's (strided) views are kept: no copy. mean-std: only
    scale_raw is read (d mean_raw_k = dm / K), and a view of one half of the model's [K, B, 2C, ...]
    output would keep the whole buffer alive, so a non-contiguous scale_raw is kept as a compact copy
    (half that memory); a contiguous one is kept as it is."""
    if ratio:
        return mean_raw, scale_raw
    return None, scale_raw.contiguous()


@dataclass(frozen=True)
class Backend:
    """One implementation of the two OU ops. ``probe(device)`` returns (available, reason)."""

    name: str
    correlated_samples: Callable  # (z, mu, sigma, rho, K, seed) -> [K, B, *S]
    gaussian_head_logprob: Callable  # (mean_raw, scale_raw, target, mode, min_scale) -> [B]
    correlated_noise: Callable  # (seed, K, shape, device) -> [K, *shape] float32
    probe: Callable  # (device: torch.device) -> (bool, str)
    devices: tuple = ("cpu", "cuda")
