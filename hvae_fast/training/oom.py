"""Allocation failures as one line naming the flag to lower."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import HVAEError
from .trainer import is_out_of_memory


@contextlib.contextmanager
def out_of_memory(hint: str):
    """Turn an allocation failure (CUDA, or the CPU allocator's) into an HVAEError naming the flag to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise HVAEError(f"out of GPU memory {hint}") from None
    except MemoryError:  # numpy's and Python's own
        raise HVAEError(f"out of memory {hint}") from None
    except RuntimeError as exc:
        # The CPU allocator's messages, and torch's for a size past 2**63 bytes.
        if is_out_of_memory(exc) or "Storage size calculation overflowed" in str(exc):
            raise HVAEError(f"out of memory {hint}") from None
        raise


def device_memory(device) -> tuple[int, str]:
    """(total bytes, "GPU" or "CPU") of ``device`` ("cpu", "cuda", "cuda:N", "auto")."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory, "GPU"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "CPU"


def check_fits(need_bytes: float | None, device, what: str, fix: str) -> None:
    """Refuse, before any allocation, work that needs at least ``need_bytes`` (None: more than a
    tensor can hold) when that exceeds the device's total memory: "out of memory: WHAT needs ..., FIX"."""
    total, where = device_memory(device)
    if need_bytes is None or need_bytes > total:
        size = "more than a tensor can hold" if need_bytes is None else f"at least {need_bytes / 2**30:.3g} GiB"
        raise HVAEError(f"out of memory: {what} needs {size}, more than the {total / 2**30:.3g} GiB of the {where}: {fix}")
