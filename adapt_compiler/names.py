"""Names shared across layers: graph attribute prefixes and PEFT's key prefix. A leaf module."""

from __future__ import annotations

from torch import nn

SLOTS = "ac_slots"  # the adapted layers' AdapterSlots: `ac_slots.<slot_key(fqn)>`
SAVED = "ac_saved"  # modules_to_save copies: `ac_saved.<slot_key(fqn)>`
GRAPH_PREFIX = "ac_graph_"  # a graph-level method's modules: `ac_graph_<adapter>.<path>`
PREP_PREFIX = "ac_prep"  # batched parameter transforms: `ac_prep_<i>`
POOL = "ac_pool"  # the serving pool's banks: `ac_pool.<slot_key(fqn)>` (lowering/pool.py)
# prefixes of the adapter tensors in an unmerged graph or exported program
ADAPTER_PREFIXES = (f"{SLOTS}.", f"{SAVED}.", GRAPH_PREFIX)

PEFT_PREFIX = "base_model.model."  # PEFT's state-dict keys: base_model.model.<module path>.<param>
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def slot_key(fqn: str) -> str:
    """A module FQN as one attribute name (ModuleDict keys cannot contain dots)."""
    return fqn.replace(".", "__") or "__root__"


def slot_target(fqn: str) -> str:
    """The call_module target of the slot of layer `fqn`."""
    return f"{SLOTS}.{slot_key(fqn)}"


def pool_target(fqn: str) -> str:
    return f"{POOL}.{slot_key(fqn)}"


def saved_target(fqn: str) -> str:
    return f"{SAVED}.{slot_key(fqn)}"


def graph_target(adapter: str, path: str = "") -> str:
    return f"{GRAPH_PREFIX}{adapter}" + (f".{path}" if path else "")


def attach(root, path: str, value) -> None:
    """Put `value` at dotted `path` under nn.Module `root`, creating empty parent modules: a
    Parameter as a parameter, a Module as a submodule, a tensor as a non-persistent buffer (the
    tensors an FX graph's get_attr nodes read), anything else as a plain attribute."""
    *parents, leaf = path.split(".")
    obj = root
    for part in parents:
        if not hasattr(obj, part):
            obj.add_module(part, nn.Module())
        obj = getattr(obj, part)
    if isinstance(value, nn.Parameter):
        obj.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        obj.add_module(leaf, value)
    elif hasattr(value, "shape"):
        obj.register_buffer(leaf, value, persistent=False)
    else:
        setattr(obj, leaf, value)

