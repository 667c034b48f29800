"""The adapter passes, run in order over a captured graph of the base model.

    1. insert_weight_adapters   aten.linear / addmm / conv2d / embedding of each target -> its AdapterSlot
    2. redirect_saved_modules   parameter reads of `modules_to_save` modules -> the active copy
    3. graph methods            structural rewrites (Llama-Adapter at SDPA, X-LoRA's dual pass)

Every inserted node carries `node.meta["adapter"] = (adapter_names, method, target_fqn)`, and each
pass bumps a counter in `COUNTERS` that `report()` shows and tests assert.
"""

from __future__ import annotations

import collections
import importlib
import os
import pkgutil

from torch import fx

from .match import LAYER_OPS, find_layer_nodes, find_param_reads
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod
from .registry import METHODS, PEFT_TYPES, method_for, method_for_peft_type, register

COUNTERS: collections.Counter = collections.Counter()

_SKIP = {"match", "method", "registry"}


def load_methods() -> None:
    """Import every method file in this package; each registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SKIP:
            importlib.import_module(f"{__name__}.{info.name}")


def insert_weight_adapters(gm: fx.GraphModule, slots: dict, slot_prefix: str) -> int:
    """Replace each target layer op by `call_module(slot)(x, W, b)`. Returns the number replaced."""
    found = find_layer_nodes(gm, set(slots))
    count = 0
    for fqn, nodes in found.items():
        slot = slots[fqn]
        for node in nodes:
            w_idx, x_idx, b_idx = LAYER_OPS[node.target]
            x, w = node.args[x_idx], node.args[w_idx]
            b = node.args[b_idx] if b_idx is not None and len(node.args) > b_idx else None
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(f"{slot_prefix}.{_key(fqn)}", (x, w, b))
            new.meta.update(node.meta)
            new.meta["adapter"] = (tuple(slot.methods), _methods(slot), fqn)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    COUNTERS["weight_adapters_inserted"] += count
    missing = set(slots) - set(found)
    if missing:
        raise AdapterError(
            f"targets {sorted(missing)[:5]} exist in the model but were never called in its forward "
            f"with these inputs, so no adapter could be wired in; drop them from `targets`."
        )
    return count


def redirect_saved_modules(gm: fx.GraphModule, saved: dict, slot_prefix: str) -> int:
    count = 0
    for fqn in saved:
        for node in find_param_reads(gm, fqn):
            attr = node.target[len(fqn) + 1 :]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"{slot_prefix}.{_key(fqn)}", (node,), {"attr": attr})
            new.meta.update(node.meta)
            new.meta["adapter"] = (tuple(saved[fqn].copies), "modules_to_save", fqn)
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            count += 1
    COUNTERS["saved_module_reads_redirected"] += count
    return count


def _key(fqn: str) -> str:
    from ..slots import slot_key

    return slot_key(fqn)


def _methods(slot) -> str:
    return ",".join(sorted({m.name for m in slot.methods.values()}))


def debug_print(gm: fx.GraphModule, title: str) -> None:
    """ADAPT_COMPILER_DEBUG=1 prints the graph after each pass."""
    if os.environ.get("ADAPT_COMPILER_DEBUG"):
        print(f"===== after {title} =====")
        print(gm.graph)


load_methods()

__all__ = [
    "COUNTERS",
    "METHODS",
    "PEFT_TYPES",
    "AdapterError",
    "AdapterShapeError",
    "Layer",
    "WeightMethod",
    "insert_weight_adapters",
    "method_for",
    "method_for_peft_type",
    "redirect_saved_modules",
    "register",
]
