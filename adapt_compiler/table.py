"""The adapter table: what the pipeline, the methods and the file formats read about one AdaptedModule.

The pipeline and every callee take an `AdapterTable`, never the AdaptedModule itself: it names the
user's model (read, never modified), the frozen base tensors by FQN, the adapters' specs and active
set, and the modules that hold adapter tensors. AdaptedModule registers the same ModuleDicts as its
children, so `.parameters()`, `.state_dict()` and `.to()` see every tensor once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class AdapterState:
    """What all runtime modules of one AdaptedModule read when a graph runs (shared, plain Python)."""

    active: tuple[str, ...] = ()
    mixed: Any = None  # lowering.mixed.MixedBatch of the current call (adapter_names=...), else None
    pool_index: Any = None  # [batch] int64: each sample's slot in the serving pool (-1: none), per call
    specs: dict = field(default_factory=dict)  # adapter name -> spec


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


@dataclass
class Recompute:
    """Activation checkpointing of the training graphs (lowering/recompute.py applies it).

    `mode`: "model" follows the user's model (its layers' `gradient_checkpointing` flags, set by
    HF's `gradient_checkpointing_enable()` before `ac.compile`); "on" checkpoints every
    `every_n_layers`-th repeated block (`m.gradient_checkpointing_enable()`); "off" none.
    `memory_budget`: the fraction of activation memory a training step may keep (None = no limit);
    Inductor gets it as AOTAutograd's `activation_memory_budget`, other lowerings checkpoint that
    share of the blocks (`by_blocks`)."""

    mode: str = "model"
    every_n_layers: int = 1
    options: dict = field(default_factory=dict)  # torch.utils.checkpoint options (preserve_rng_state, ...)
    memory_budget: float | None = None
    by_blocks: bool = True  # the lowering cannot take a memory budget itself (not Inductor)

    def key(self) -> tuple:
        """Part of a training graph's cache key (module.py `_graph_key`): switching checkpointing off
        and on again (TRL's DPO does it around every reference pass) finds the graphs built before."""
        return self.mode, self.every_n_layers, tuple(sorted(self.options.items())), self.memory_budget, self.by_blocks


@dataclass(eq=False)
class AdapterTable:
    """Everything known about the adapters of one AdaptedModule (see the module docstring)."""

    model: nn.Module  # the user's model: read, never modified
    frozen: dict[str, torch.Tensor]  # FQN -> frozen base tensor (same storage as the user's; tied share one)
    state: AdapterState
    slots: nn.ModuleDict  # slot_key(fqn) -> lowering.slots.AdapterSlot (weight methods)
    saved: nn.ModuleDict  # slot_key(fqn) -> lowering.slots.SavedModuleSlot (modules_to_save)
    graph_adapters: nn.ModuleDict  # adapter name -> a graph method's modules
    shared: nn.ModuleDict  # adapter name -> AdapterParams a weight method shares across layers
    method_state: dict = field(default_factory=dict)  # adapter name -> a method's Python state (AdaLoRA)
    prepare_hooks: list = field(default_factory=list)  # callables run before each eager call (see GraphMethod)
    recompute: Recompute = field(default_factory=Recompute)  # activation checkpointing of training graphs
    # adapter name -> {weight FQN: the frozen data before its init swapped in a residual base (PiSSA, ...)}
    base_originals: dict = field(default_factory=dict)
    # adapter name -> its pending data pass (data_init/): "eva" / "corda" / "lora_ga" (the factors come from the
    # data), "corda-residual" / "lora_ga-residual" (factors loaded from a checkpoint; the pass rebuilds the
    # residual base they belong to)
    data_init: dict = field(default_factory=dict)
    # adapter name -> the generators' state when it was created, for a data pass that draws what PEFT draws at
    # creation (LoRA-GA's randomized SVD; passes/_lora_init.rng_state)
    data_init_rng: dict = field(default_factory=dict)
    pool: Any = None  # lowering.pool.AdapterPool: adapters served from preallocated slots, or None
    # FQN -> quant.QuantInfo of each quantized layer, read once at compile time; its operands are in `frozen`
    quant: dict = field(default_factory=dict)
    # graph fingerprint -> the guard's verdict saved with a compile cache whose key matched this module
    # (compile_cache.load fills it; lowering/guard.py reuses a verdict only for the identical compiled code)
    verified: dict = field(default_factory=dict)

    @property
    def specs(self) -> dict:
        return self.state.specs

    @property
    def active(self) -> tuple[str, ...]:
        return self.state.active

    def slots_fqns(self) -> list[str]:
        return [s.layer.fqn for s in self.slots.values()]

    def spec_of(self, name: str):
        """The spec of a regular or a pool adapter (KeyError if neither)."""
        if name in self.state.specs:
            return self.state.specs[name]
        if self.pool is not None and name in self.pool:
            return self.pool.specs[name]
        raise KeyError(name)

    def names(self) -> list[str]:
        """Every adapter: the regular ones, then the pool's."""
        return [*self.state.specs, *(self.pool.names if self.pool is not None else ())]

    def slots_of(self, adapter: str) -> list:
        return [s for s in self.slots.values() if adapter in s.methods]

    def tensors(self):
        """(adapter, where, parameter name, parameter) for every adapter parameter; `where` is the
        layer or module it belongs to. X-LoRA's frozen experts (`_ac_frozen`) are not listed."""
        for slot in self.slots.values():
            for name, params in slot.adapters.items():
                for pname, p in params.named_parameters():
                    yield name, slot.layer.fqn, pname, p
        for name, params in self.shared.items():
            for pname, p in params.named_parameters():
                yield name, "(shared)", pname, p
        for slot in self.saved.values():
            for name, clone in slot.copies.items():
                for pname, p in clone.named_parameters():
                    yield name, slot.fqn, pname, p
        for name, holder in self.graph_adapters.items():
            for pname, p in holder.named_parameters():
                if not getattr(p, "_ac_frozen", False):
                    yield name, "(graph)", pname, p

    def same_tensor(self, a: str, b: str) -> bool:
        """Whether two FQNs name one frozen tensor (tied weights share one), or are the same name."""
        ta, tb = self.frozen.get(a), self.frozen.get(b)
        return a == b if ta is None or tb is None else ta is tb

    def model_config(self):
        """The model's HF config, or None for a plain module."""
        return getattr(self.model, "config", None)
