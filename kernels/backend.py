"""The ``triton`` OU backend: registers the fused Triton ops with ``hvae_fast.ops.ou``.

This module always imports, even without a working Triton: the backend is then listed with
probe() -> (False, "triton not importable: <error>") and its ops raise HVAEError.

TRITON_INTERPRET=1 must be in the environment before this module (and the kernel modules) is
first imported: Triton decides at kernel definition time whether kernels run compiled (GPU) or
under the CPU interpreter.
"""

from __future__ import annotations

import os

import torch

from hvae_fast.errors import HVAEError
from hvae_fast.ops.backends import Backend

try:
    import triton

    from .correlated_sample import correlated_noise, correlated_samples
    from .gaussian_head import gaussian_head_logprob

    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a Triton that fails while defining the kernels
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    def _unavailable(*_args, **_kwargs):
        raise HVAEError(f"the triton OU backend is unavailable (triton not importable: {_IMPORT_ERROR}): "
                        "pass --backend torch")

    correlated_samples = correlated_noise = gaussian_head_logprob = _unavailable


def _triton_version() -> str:
    parts = str(getattr(triton, "__version__", "?")).split(".")
    return ".".join(parts[:2])


def probe(device) -> tuple[bool, str]:
    """(available, reason) for running the Triton kernels on ``device``."""
    if _IMPORT_ERROR is not None:
        return False, f"triton not importable: {_IMPORT_ERROR}"
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        if interpret:
            return True, f"triton {_triton_version()} interpreter on {name} (TRITON_INTERPRET=1: slow, for testing)"
        return True, f"triton {_triton_version()} on {name}"
    if device.type == "cpu":
        if interpret:
            return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, for testing"
        return False, "Triton needs a GPU; set TRITON_INTERPRET=1 to run the interpreter on CPU (slow, for tests)"
    return False, f"does not run on {device.type}"


BACKENDS = [
    Backend(
        name="triton",
        correlated_samples=correlated_samples,
        gaussian_head_logprob=gaussian_head_logprob,
        correlated_noise=correlated_noise,
        probe=probe,
        devices=("cuda", "cpu"),
    )
]
