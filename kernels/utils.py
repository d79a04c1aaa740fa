"""Launch helpers shared by the fused Triton ops (block size, warps, dtypes).

Importing this module never needs a GPU, nor Triton (``join_f64``, a jit helper, is None without it).
"""

from __future__ import annotations

import os
import struct

import torch

from hvae_fast.errors import HVAEError

# Elementwise ops are memory bound: 1024 elements per program with 4 warps is a good default on
# A100/H100 class GPUs. Under the CPU interpreter every program instance is a Python-level loop,
# so large blocks (fewer programs) are much faster there.
MAX_BLOCK = 1024
INTERPRETER_BLOCK = 4096

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


try:
    import triton
    import triton.language as tl
except Exception:  # the op modules need Triton anyway; this module must import without it
    triton = tl = None


def split_f64(x: float) -> tuple[float, float]:
    """(hi, lo), two float32 values with hi + lo = x to 2^-48 relative: a double as kernel scalars.

    Triton passes a Python float as a float32 argument (the CPU interpreter too, whatever the
    annotation), so a float64 coefficient travels as two; ``join_f64`` adds them back in the
    kernel. hi alone is float32(x), so float32 compute sees exactly float32(x)."""
    x = float(x)
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def _join_f64(hi, lo, DTYPE: tl.constexpr):
    """The value split_f64 split, in DTYPE: hi + lo in float64, hi (= float32(x)) otherwise."""
    if DTYPE == tl.float64:
        return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)
    return tl.cast(hi, DTYPE)




join_f64 = triton.jit(_join_f64) if triton is not None else None
