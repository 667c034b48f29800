"""The modules the adapter pass wires into the captured graph, one per adapted base-model module.

`AdapterSlot` replaces one `aten.linear` / `addmm` (HF Conv1D) / `conv2d` / `embedding` node: it
receives the node's activation, weight and bias and returns the adapted output of the active
adapter(s). `SavedModuleSlot` replaces the parameter reads of a `modules_to_save` module with the
active adapter's trainable copy. Both are plain modules: eager runs them, Dynamo and torch.export
trace through them into one flat ATen graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .passes.method import PREPARED, AdapterError, Layer


@dataclass
class AdapterState:
    """What all slots of one AdaptedModule read at run time (shared, plain Python)."""

    active: tuple[str, ...] = ()
    mixed: tuple[str, ...] | None = None  # per-sample adapter names of the current call
    specs: dict = field(default_factory=dict)  # adapter name -> spec


def slot_key(fqn: str) -> str:
    return fqn.replace(".", "__") or "__root__"


class AdapterParams(nn.Module):
    """One adapter's tensors on one layer: trainable ones as parameters, state as buffers."""

    def __init__(self, tensors: dict[str, torch.Tensor], buffer_names=frozenset()):
        super().__init__()
        for name, t in tensors.items():
            if name in buffer_names:
                self.register_buffer(name, t)
            else:
                self.register_parameter(name, nn.Parameter(t))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}


class AdapterSlot(nn.Module):
    def __init__(self, layer: Layer, state: AdapterState):
        super().__init__()
        self.layer = layer
        self.state = state
        self.adapters = nn.ModuleDict()  # adapter name -> AdapterParams
        self.methods: dict[str, object] = {}  # adapter name -> method object
        # per mode (training flag) -> adapter name -> "activation" | "weight" | "kernel": the train
        # and eval graphs choose separately, and one mode's choice must not leak into the other's graph
        self.orders_by_mode: dict[bool, dict[str, str]] = {True: {}, False: {}}
        self.costs: dict[str, dict] = {}  # adapter name -> cost-model figures (report)

    @property
    def orders(self) -> dict[str, str]:
        """The evaluation order of each adapter in the current mode (set by lowering.choose_orders)."""
        return self.orders_by_mode[self.training]

    def add(self, name: str, method, params: AdapterParams) -> None:
        self.adapters[name] = params
        self.methods[name] = method
        for orders in self.orders_by_mode.values():
            orders[name] = "activation"

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.methods.pop(name)
        for orders in self.orders_by_mode.values():
            orders.pop(name)

    def params(self, name: str) -> dict[str, torch.Tensor]:
        return self.adapters[name].as_dict()

    def evaluate(self, name: str, x, weight, bias, prepared=None):
        """One adapter's output on this layer, in the order the lowering chose.

        `prepared`: this layer's share of a parameter-only transform batched over layers
        (lowering/batching.py); it serves the activation order only."""
        method, spec, layer = self.methods[name], self.state.specs[name], self.layer
        if self.orders[name] == "kernel" and x.is_cuda and method.name == "lora" and not (
                self.training and getattr(spec, "dropout", 0.0)):
            from .lowering.kernels import lora_kernel_forward  # fused Triton LoRA (CUDA)

            return lora_kernel_forward(self, name, x, weight, bias)
        p = self.params(name)
        if self.orders[name] == "weight" and method.weight_side_ok(spec, self.training):
            # fold ΔW / the rotation into one GEMM: x·(W')ᵀ
            w, b = method.merged_weight(spec, layer, p, weight, bias)
            return layer.base(x, w, b)
        if prepared is not None and self.orders[name] == "activation":
            p = {**p, PREPARED: prepared}
        return method.forward(spec, layer, p, x, weight, bias, self.training)

    def forward(self, x, weight, bias=None, prepared=None):
        layer = self.layer
        if layer.transposed:  # HF Conv1D: addmm(b, x, W) with W stored (d_in, d_out)
            weight = weight.t()
        if self.state.mixed is not None:
            from .lowering.mixed import mixed_batch_forward

            return mixed_batch_forward(self, x, weight, bias)
        names = [n for n in self.state.active if n in self.methods]
        if not names:
            return layer.base(x, weight, bias)
        if len(names) == 1:
            return self.evaluate(names[0], x, weight, bias, (prepared or {}).get(names[0]))
        out = layer.base(x, weight, bias)
        for name in names:
            method = self.methods[name]
            if method.merge_kind != "additive":
                raise AdapterError(
                    f"{layer.fqn}: several active adapters can only be combined when all are additive; "
                    f"{name!r} ({method.name}) is not. Activate one adapter at a time."
                )
            out = out + method.delta(self.state.specs[name], layer, self.params(name), x, weight, self.training)
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
                return self.copies[name].get_parameter(attr) if attr in dict(
                    self.copies[name].named_parameters()
                ) else self.copies[name].get_buffer(attr)
        return original
