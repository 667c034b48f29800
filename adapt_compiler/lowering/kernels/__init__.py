"""Triton kernels for the LoRA lowering, each a `torch.library.triton_op` with a pure-torch reference.

    fused_lora.py   adapt_compiler::fused_lora_linear   y = x Wᵀ + b + s·(x Aᵀ) Bᵀ   (one pass per output tile)
    multi_lora.py   adapt_compiler::multi_lora          y = base + s[i]·(x Aᵢᵀ) Bᵢᵀ, i picked per sample (SGMV)

The ops run the Triton kernel on CUDA and their reference (`_name_ref`) elsewhere, so that
torch.compile / torch.export trace them on any device (Inductor emits C++ for the reference on
CPU). Under `TRITON_INTERPRET=1` the kernels also run on CPU tensors: tests call the launchers
directly, or wrap a call in `interpret_kernels()` to route the ops through the kernels.
"""

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


def kernel_applies(method, spec, layer, training: bool) -> bool:
    """LoRA slots the fused kernel serves: Linear / Conv1D, no DoRA, no active dropout."""
    return (
        getattr(method, "name", None) == "lora"
        and layer.kind == "linear"
        and not getattr(spec, "use_dora", False)
        and not (training and getattr(spec, "dropout", 0.0))
    )


def lora_kernel_forward(slot, name: str, x, weight, bias):
    """One LoRA adapter on a slot through the fused op (y = x Wᵀ + b + s·(x Aᵀ) Bᵀ)."""
    from ...passes.lora import scaling_of
    from .fused_lora import fused_lora_linear

    p = slot.params(name)
    s = scaling_of(slot.state.specs[name], slot.layer)
    return fused_lora_linear(x, weight, bias, p["lora_A"], p["lora_B"], s)


from .fused_lora import fused_lora_linear  # noqa: E402
from .multi_lora import add_multi_lora  # noqa: E402

__all__ = [
    "HAVE_TRITON",
    "INTERPRET",
    "fused_lora_linear",
    "interpret_kernels",
    "kernel_applies",
    "lora_kernel_forward",
    "add_multi_lora",
    "use_kernel",
]
