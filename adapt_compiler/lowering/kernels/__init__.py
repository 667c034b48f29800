"""Triton kernels for the LoRA lowering, each a `torch.library.triton_op` with a pure-torch reference.

    fused_lora.py   adapt_compiler::fused_lora_linear   y = x Wᵀ + b + s·(x Aᵀ) Bᵀ   (one pass per output tile)
    multi_lora.py   adapt_compiler::multi_lora          y = base + s[i]·(x Aᵢᵀ) Bᵢᵀ, i picked per sample (SGMV)

Which adapters they serve is the method's say (`WeightMethod.kernel_operands`: LoRA on Linear /
Conv1D without DoRA or active dropout); the plan records the choice on the graph (lowering/plan.py).
The ops run the Triton kernel on CUDA and their reference (`_name_ref`) elsewhere, so that
torch.compile / torch.export trace them on any device (Inductor emits C++ for the reference on
CPU). Under `TRITON_INTERPRET=1` the kernels also run on CPU tensors: tests call the launchers
directly, or wrap a call in `interpret_kernels()` to route the ops through the kernels.
"""

from __future__ import annotations

from ._runtime import HAVE_TRITON, INTERPRET, interpret_kernels, use_kernel
from .fused_lora import fused_lora_linear
from .multi_lora import add_multi_lora

__all__ = [
    "HAVE_TRITON",
    "INTERPRET",
    "fused_lora_linear",
    "interpret_kernels",
    "add_multi_lora",
    "use_kernel",
]
