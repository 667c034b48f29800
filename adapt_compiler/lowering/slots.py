"""The runtime modules the adapted graph calls: one `AdapterSlot` per adapted base-model layer.

`AdapterSlot` replaces one `aten.linear` / `addmm` (HF Conv1D) / `conv2d` / `embedding` node: it
receives the node's activation, weight and bias and returns the adapted output of the active
adapter(s). What it computes is decided when the graph is built and written on the node as keyword
arguments, so every graph carries its own decisions (lowering/plan.py):

    call_module(ac_slots.<layer>)(x, W, b, orders={adapter: "activation" | "weight" | "kernel"},
                                  training=<graph mode>, mixed=None | "multi_lora" | "select",
                                  prepared={adapter: <share of a batched parameter transform>})

Over a quantized layer (quant/), W is the tuple of its op's operands (packed weight, scales) and
constants; the slot hands methods a `QuantizedWeight` over them, whose `Layer.base` is the quantized
op itself. At run time the slot only reads which adapters are active (`set_adapter`) and, in a mixed-batch
graph, each sample's adapter. `SavedModuleSlot` replaces the parameter reads of a
`modules_to_save` module with the active adapter's trainable copy. Both are plain modules: eager
runs them, Dynamo and torch.export trace through them into one flat ATen graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from ..passes.method import PREPARED, Layer
from ..quant import QuantizedWeight
from ..table import AdapterParams, AdapterState
from . import kernels


class AdapterSlot(nn.Module):
    def __init__(self, layer: Layer, state: AdapterState):
        super().__init__()
        self.layer = layer
        self.state = state
        self.adapters = nn.ModuleDict()  # adapter name -> AdapterParams
        self.methods: dict[str, object] = {}  # adapter name -> method object
        self.__dict__["shared"] = {}  # adapter name -> AdapterParams shared across layers (owned by the table)

    def add(self, name: str, method, params: AdapterParams, shared: AdapterParams | None = None) -> None:
        self.adapters[name] = params
        self.methods[name] = method
        if shared is not None:
            self.shared[name] = shared

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.methods.pop(name)
        self.shared.pop(name, None)

    def params(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors on this layer, plus any it shares across layers (init_shared)."""
        own = self.adapters[name].as_dict()
        shared = self.shared.get(name)
        return {**shared.as_dict(), **own} if shared is not None else own

    def evaluate(self, name: str, x, weight, bias, order: str, training: bool, prepared=None):
        """One adapter's output on this layer in the given order (see the module docstring)."""
        method, spec, layer = self.methods[name], self.state.specs[name], self.layer
        p = self.params(name)
        if order == "kernel" and x.is_cuda:
            a, b, s = method.kernel_operands(spec, layer, p, training)
            return kernels.fused_lora_linear(x, weight, bias, a, b, s)  # the fused Triton kernel
        if order == "weight":  # fold ΔW / the rotation into one GEMM: x·(W')ᵀ
            if isinstance(weight, QuantizedWeight):  # W' = dequantize + ΔW, freed after the GEMM (eval only)
                w, b = method.merged_weight(spec, layer, p, weight.dequantize(), bias)
                return weight.linear(x, b, dense=w)
            w, b = method.merged_weight(spec, layer, p, weight, bias)
            return layer.base(x, w, b)
        if prepared is not None:
            p = {**p, PREPARED: prepared}
        return method.forward(spec, layer, p, x, weight, bias, training)

    def forward(self, x, weight, bias=None, *, orders: dict, training: bool, mixed: str | None = None,
                prepared: dict | None = None):
        layer = self.layer
        if layer.transposed:  # HF Conv1D: addmm(b, x, W) with W stored (d_in, d_out)
            weight = weight.t()
        if layer.quant is not None:  # a quantized layer: `weight` is its op's operands and constants
            weight = QuantizedWeight(layer.quant, weight, x.dtype)
        if mixed is not None:
            from .mixed import mixed_batch_forward

            return mixed_batch_forward(self, x, weight, bias, orders, training, mixed)
        names = [n for n in self.state.active if n in self.methods]
        if not names:
            return layer.base(x, weight, bias)
        if len(names) == 1:
            name = names[0]
            return self.evaluate(name, x, weight, bias, orders[name], training, (prepared or {}).get(name))
        out = layer.base(x, weight, bias)
        for name in names:
            method = self.methods[name]
            if method.merge_kind != "additive":
                raise AdapterError(
                    f"{layer.fqn}: several active adapters can only be combined when all are additive; "
                    f"{name!r} ({method.name}) is not. Activate one adapter at a time."
                )
            out = out + method.delta(self.state.specs[name], layer, self.params(name), x, weight, training)
        return out


class SavedModuleSlot(nn.Module):
    """`modules_to_save`: per adapter, a trainable copy of one module; reads go to the active copy."""

    def __init__(self, fqn: str, state: AdapterState):
        super().__init__()
        self.fqn = fqn
        self.state = state
        self.copies = nn.ModuleDict()  # adapter name -> copy of the module

    def forward(self, original, attr: str):
        for name in self.state.active:
            if name in self.copies:
                copy = self.copies[name]
                params = dict(copy.named_parameters())
                return params[attr] if attr in params else copy.get_buffer(attr)
        return original
