"""LoRA initialisers: PEFT's `init_lora_weights` values beyond True / False / "gaussian", a registry.

A helper file, not a method (the registry of methods skips `_`-prefixed files). Each initialiser
lives in its own `_lora_init_<name>.py`, which registers an `Initialiser` on import; this module
imports every such file, so one more (e.g. LoftQ) is one new file and touches nothing else.

An initialiser maps a layer's frozen weight W (canonical layout, (d_out, d_in)) to the adapter's
starting factors A (r, d_in) and B (d_out, r), and optionally to a new frozen base weight:
PiSSA / OLoRA / CorDA start from W's principal part, so the base becomes the residual
W − s·B₀A₀ and the adapted layer still computes W at init, as PEFT does (PEFT overwrites the
model's weight; we swap the residual into our frozen copy, never the user's model). Loading a
checkpoint saved with such an init runs the init again, then copies the trained A, B over it: the
residual is part of what the checkpoint means, in PEFT as here.

Data-driven initialisers (EVA, CorDA: `data=True`) start as the plain init (A kaiming, B zero); their
factors come from a pass over the user's data that data_init/ runs on the captured graph
(ac.initialize_eva, ac.preprocess_corda, or compile(init_data=)). Their math is in their own files here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import AdapterError


@dataclass(frozen=True)
class InitResult:
    a: torch.Tensor  # (r, d_in) / the embedding's (r, num_embeddings)
    b: torch.Tensor  # (d_out, r) / (dim, r)
    base: torch.Tensor | None = None  # the layer's new frozen weight (canonical layout), or None: unchanged


@dataclass(frozen=True)
class Initialiser:
    name: str  # PEFT's init_lora_weights value, e.g. "pissa"
    # (layer, weight, r, scaling, option) -> InitResult; `option` is what follows the name (pissa_niter_<k>)
    init: Callable
    kinds: frozenset = frozenset({"linear"})  # layer kinds PEFT runs it on
    transposed_ok: bool = True  # HF Conv1D (weights stored (d_in, d_out))
    frozen: frozenset = frozenset()  # tensors that stay frozen (MiCA's lora_B): saved, never trained
    data: bool = False  # completed from the layers' inputs over the user's data (data_init/)
    pattern: str | None = None  # a regex for parametrised names, e.g. r"pissa_niter_(\d+)"
    # its data pass draws random numbers that PEFT draws when it creates the adapter (LoRA-GA's SVD): the
    # generators' state at creation is kept (table.data_init_rng) and the pass replays from it
    rng: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)


INITIALISERS: dict[str, Initialiser] = {}


def peft_sub_config(config: dict | None, field: str, defaults: dict, peft_class: str) -> dict:
    """A PEFT sub-config given as a dict (`eva_config=`, `corda_config=`, ...) with PEFT's defaults filled in;
    unknown keys are refused by name, as PEFT's dataclass refuses them."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise AdapterError(f"LoRA: {field} has unknown keys {unknown}; PEFT's {peft_class} fields are "
                           f"{sorted(defaults)}.")
    return {**defaults, **config}


def rng_state(device: torch.device) -> dict:
    """The generators PEFT's init draws from: the CPU one (nn.Linear's init) and the weight's device's (the SVD)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


@contextmanager
def replayed(state: dict):
    """Run with the generators set to `state`, and give the caller's generators back afterwards."""
    devices = [state["cuda"][0]] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"][1], state["cuda"][0])
        yield


def register_init(init: Initialiser) -> None:
    if init.name in INITIALISERS:
        raise AdapterError(f"LoRA initialiser {init.name!r} is registered twice.")
    INITIALISERS[init.name] = init


def initialiser_for(value) -> tuple[Initialiser, str] | None:
    """(initialiser, its option) for an `init` value that names a registered one, else None."""
    if not isinstance(value, str):
        return None
    if value in INITIALISERS:
        return INITIALISERS[value], ""
    for init in INITIALISERS.values():
        if init.pattern and (m := re.fullmatch(init.pattern, value)):
            return init, m.group(1)
    return None


def _load() -> None:
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_lora_init_"):
            importlib.import_module(f"{__package__}.{info.name}")


_load()
