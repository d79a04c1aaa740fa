"""Launch helpers shared by the fused Triton ops (block size, warps, contiguity, dtypes).

Importing this module never needs a GPU. ``triton`` is imported lazily by the op modules; this
file only uses it for ``triton.next_power_of_2`` when it is importable.
"""

from __future__ import annotations

import functools
import os

import torch

from hvae_fast.errors import HVAEError

# Elementwise ops are memory bound: 1024 elements per program with 4 warps is a good default on
# A100/H100 class GPUs. Under the CPU interpreter every program instance is a Python-level loop,
# so large blocks (fewer programs) are much faster there.
MAX_BLOCK = 1024
INTERPRETER_BLOCK = 4096

# Philox offsets are computed in int64 inside the kernels; 2**62 leaves headroom for the
# offset_base + k * N + j sum to stay positive in a signed 64-bit integer.
MAX_PHILOX_OFFSET = 2**62

# Supported floating dtypes and what the kernels compute in for each.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def elementwise_block(n: int) -> int:
    """Block size for a 1-D elementwise kernel over ``n`` elements: a power of two, >= 16."""
    cap = INTERPRETER_BLOCK if interpreter_active() else MAX_BLOCK
    return max(16, min(cap, next_power_of_2(n)))


def num_warps_for(block: int) -> int:
    """Warps per program for an elementwise block (Liger's heuristic, scaled down for small blocks)."""
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    if block >= 128:
        return 2
    return 1


def ensure_contiguous(fn):
    """Decorator (as in Liger-Kernel): make every tensor argument contiguous before calling ``fn``."""

    @functools.wraps(fn)
    def wrapper(ctx, *args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        return fn(ctx, *args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / arithmetic dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise HVAEError(
            f"{name} has dtype {t.dtype}; the Triton OU kernels support "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}: cast it first"
        )


def check_same(names, tensors, what: str = "shape") -> None:
    """Raise HVAEError unless all tensors agree on ``what`` (shape, dtype or device)."""
    vals = [getattr(t, what) for t in tensors]
    if any(v != vals[0] for v in vals[1:]):
        desc = ", ".join(f"{n} {tuple(v) if what == 'shape' else v}" for n, v in zip(names, vals))
        raise HVAEError(f"the OU op needs {', '.join(names)} with the same {what}, got {desc}")


def check_philox_range(K: int, n: int, offset_base: int = 0) -> None:
    """The Philox offsets offset_base + k * n + j must fit in int64 with headroom (< 2**62)."""
    if offset_base < 0:
        raise HVAEError(f"offset_base must be >= 0, got {offset_base}")
    if offset_base + K * n >= MAX_PHILOX_OFFSET:
        raise HVAEError(
            f"K * numel = {K} * {n} (+ offset_base {offset_base}) reaches 2**62 Philox offsets: "
            "reduce the number of OU samples K or the batch size"
        )
