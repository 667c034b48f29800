"""The adapter passes: rewrites of a captured base graph that wire the adapters in.

    redirect_saved_modules   parameter reads of `modules_to_save` modules -> the active copy
    insert_weight_adapters   aten.linear / addmm / conv2d / embedding of each target -> its slot
    (graph methods)          structural rewrites, each method's own `rewrite` (Llama-Adapter at SDPA,
                             X-LoRA's dual pass)

`pipeline.py` runs them in that order, then the lowering's passes. Every inserted node carries
`node.meta["adapter"] = (adapter_names, method, target_fqn)`, and each pass bumps a counter in
`COUNTERS` that `report()` shows and tests assert. Passes import only leaf modules and each other:
never the lowering or the AdaptedModule.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import fx

from ..counters import COUNTERS
from ..errors import AdapterError, AdapterShapeError
from ..names import saved_target, slot_target
from .match import find_layer_nodes, find_param_reads, layer_operands
from .method import GraphMethod, Layer, WeightMethod
from .registry import METHODS, PEFT_TYPES, method_for, method_for_peft_type, register, unregister


def load_methods() -> None:
    """Import every method file in this package; each registers itself. Files starting with `_`
    hold shared math, and match / method / registry are the machinery: none of them is a method."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("match", "method", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


def insert_weight_adapters(gm: fx.GraphModule, layers: dict[str, tuple[tuple[str, ...], str]],
                           expected: set[str] | None = None) -> int:
    """Replace each target layer op by `call_module(slot)(x, W, b)`.

    `layers`: target FQN -> (its adapter names, its methods as text), for the node's meta.
    `expected`: the targets the graph must call (default: all); a graph of a part of the model (an
    encoder, a decoder step whose cross-attention K/V come from the cache) may lack the others.
    Returns the number of nodes replaced (a module called twice has two)."""
    found = find_layer_nodes(gm, set(layers))
    count = 0
    for fqn, nodes in found.items():
        for node in nodes:
            x, w, b = layer_operands(node)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(slot_target(fqn), (x, w, b))
            new.meta.update(node.meta)
            new.meta["adapter"] = (*layers[fqn], fqn)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    COUNTERS["weight_adapters_inserted"] += count
    missing = (set(layers) if expected is None else set(expected)) - set(found)
    if missing:
        raise AdapterError(
            f"targets {sorted(missing)[:5]} exist in the model but were never called in its forward "
            f"with these inputs, so no adapter could be wired in; drop them from `targets`."
        )
    return count


def redirect_saved_modules(gm: fx.GraphModule, saved: dict[str, tuple[str, ...]]) -> int:
    """Route every parameter/buffer read of a `modules_to_save` module through its SavedModuleSlot.

    `saved`: module FQN -> the adapter names holding a copy of it (node meta)."""
    count = 0
    for fqn, names in saved.items():
        for node in find_param_reads(gm, fqn):
            attr = node.target[len(fqn) + 1 :]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(saved_target(fqn), (node,), {"attr": attr})
            new.meta.update(node.meta)
            new.meta["adapter"] = (names, "modules_to_save", fqn)
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            count += 1
    COUNTERS["saved_module_reads_redirected"] += count
    return count


load_methods()

__all__ = [
    "COUNTERS",
    "METHODS",
    "PEFT_TYPES",
    "AdapterError",
    "AdapterShapeError",
    "GraphMethod",
    "Layer",
    "WeightMethod",
    "insert_weight_adapters",
    "method_for",
    "method_for_peft_type",
    "redirect_saved_modules",
    "register",
    "unregister",
]
