"""Whether the Triton kernels run, and where: a leaf the kernel files and the package share."""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is an optional dependency (extra [triton]); the references need only torch
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton installed
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FORCE_KERNEL = [False]


@contextlib.contextmanager
def interpret_kernels():
    """Route the ops through the Triton kernels on CPU tensors too (needs TRITON_INTERPRET=1)."""
    if not (HAVE_TRITON and INTERPRET):
        raise RuntimeError("interpret_kernels() needs triton and TRITON_INTERPRET=1 set before import.")
    _FORCE_KERNEL[0] = True
    try:
        yield
    finally:
        _FORCE_KERNEL[0] = False


def use_kernel(t: torch.Tensor) -> bool:
    """Whether the op launches its Triton kernel for a tensor on t's device."""
    if not HAVE_TRITON:
        return False
    if t.is_cuda:
        return not INTERPRET
    return INTERPRET and _FORCE_KERNEL[0] and t.device.type == "cpu"
