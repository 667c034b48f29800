"""The data pass shared by EVA and CorDA: run the captured graph eagerly, read each adapted layer's input at
its AdapterSlot, and small helpers (the adapter's layers in module order, moving batches, cache files)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import AdapterError
from ..integrations.hf_model import lift_scalar_inputs
from ..names import slot_key
from ..passes.lora import LoRA


class EagerGraph:
    """Calls `m`'s adapted graph for the inputs' structure as the FX graph itself (the eager lowering),
    whatever lowering `m` compiles with: the slots stay modules that forward hooks see."""

    def __init__(self, m, run=None):
        self.m, self.run = m, run

    def __call__(self, *args, **kwargs):
        kwargs = lift_scalar_inputs(kwargs)
        if self.run is not None:  # the call's (batch, sequence): HF Conv1D layers see their input flattened
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
            self.run.lead = None if first is None else tuple(first.shape[:2])
        return self.m.graph(args, kwargs)(*args, **kwargs)


class DataPass:
    """The context of one pass: eval mode, no grad (`train=True`: train mode and grad, LoRA-GA's training
    step), no adapter active, hooks removed at the end."""

    def __init__(self, m, name: str, train: bool = False):
        self.m, self.name, self.train = m, name, train
        self.handles = []

    def __enter__(self):
        m = self.m
        if m.merged:
            raise AdapterError("data pass: the module is merged; unmerge() first.")
        self.training, self.active = m.training, m.state.active
        self.grad = torch.is_grad_enabled()
        m.train(self.train)
        # no adapter active: every slot computes the base layer (PEFT runs under disable_adapter(), or on the
        # model before get_peft_model), and still sees its input. A CorDA adapter loaded from a checkpoint
        # holds trained factors here, which must not shift the activations
        m.set_adapter(())
        torch.set_grad_enabled(self.train)
        return self

    def hook(self, fqn: str, fn) -> None:
        """fn(x) on every call of layer `fqn`: its input, as the graph hands it to the slot. An HF Conv1D
        flattens its input to (tokens, features) before its addmm, so the slot sees it flat; PEFT's hooks see
        the module's input (batch, seq, features), which is the flat one viewed back at the call's shape."""
        slot = self.m.slots[slot_key(fqn)]

        def read(module, args, out):
            x = args[0]
            lead = getattr(self, "lead", None)
            if slot.layer.transposed and x.dim() == 2 and lead is not None and x.shape[0] == math.prod(lead):
                x = x.view(*lead, x.shape[-1])
            fn(x)  # returns None: the layer's output is left as it is

        self.handles.append(slot.register_forward_hook(read))

    def hook_output(self, fqn: str, fn) -> None:
        """fn(out) on every call of layer `fqn`: the layer's output (its base layer's, no adapter being active)."""
        self.handles.append(self.m.slots[slot_key(fqn)].register_forward_hook(lambda module, args, out: fn(out)))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        torch.set_grad_enabled(self.grad)
        if self.active:
            self.m.set_adapter(self.active)
        self.m.train(self.training)
        return False


def adapter_spec(m, name: str, init: str):
    if name not in m.state.specs:
        raise AdapterError(f"no adapter named {name!r}; known: {list(m.state.specs)}.")
    spec = m.state.specs[name]
    if not isinstance(spec, LoRA) or spec.init != init:
        raise AdapterError(f"adapter {name!r} does not have init={init!r} (PEFT's init_lora_weights); create it with "
                           f"ac.LoRA(init={init!r}, ...).")
    return spec


def layers_of(m, name: str) -> list:
    """The adapter's layers in the model's module order (the order PEFT's hooks see them)."""
    order = {fqn: i for i, (fqn, _) in enumerate(m.get_base_model().named_modules())}
    layers = [s.layer for s in m.table.slots_of(name)]
    return sorted(layers, key=lambda layer: order.get(layer.fqn, len(order)))


def to_device(inputs, device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def call(forward_fn, runner, inputs):
    if forward_fn is not None:
        return forward_fn(runner, inputs)
    if isinstance(inputs, Mapping):
        return runner(**inputs)
    return runner(*inputs) if isinstance(inputs, (tuple, list)) else runner(inputs)


def install_residual_init(m, adapter_name: str, made: dict, bases: dict, *, factors: bool) -> None:
    """Completes a residual data init (CorDA, LoRA-GA): writes each layer's A, B (``made[fqn].a``/``.b``) unless
    a loaded checkpoint already holds the trained ones (``factors=False``), swaps in the residual bases, and
    marks the adapter's data pass as done."""
    with torch.no_grad():
        if factors:
            for fqn, got in made.items():
                params = m.slots[slot_key(fqn)].adapters[adapter_name]
                params.lora_A.copy_(got.a.to(params.lora_A.dtype))
                params.lora_B.copy_(got.b.to(params.lora_B.dtype))
    m._set_residual_bases(adapter_name, bases)
    m.table.data_init.pop(adapter_name, None)


def check_not_distributed(gather: bool, what: str) -> None:
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise AdapterError(f"{what}: gathering layer inputs across ranks (gather_distributed_inputs=True under "
                           f"torch.distributed) is not implemented; run the pass on one process and load its result "
                           f"(eva_state_dict=) on every rank, or pass gather_distributed_inputs=False.")



def device_of(m):
    return next(iter(m.table.frozen.values())).device


def existing(path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.exists() and p.stat().st_size > 0 else None


def save_atomic(tensors: dict, path) -> None:
    """torch.save, written to a temporary file and renamed: never a half-written cache."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(tensors, tmp)
    tmp.replace(p)


