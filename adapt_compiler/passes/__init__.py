"""The adapter passes: rewrites of a captured base graph that wire the adapters in.

    redirect_saved_modules   parameter reads of `modules_to_save` modules -> the active copy
    insert_weight_adapters   each target's layer subgraph (match.LAYER_PATTERNS) -> its slot
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
from .match import find_layer_matches, find_param_reads, find_tensor_reads, refresh, survey
from .method import GraphMethod, Layer, WeightMethod
from .registry import METHODS, PEFT_TYPES, method_for, method_for_peft_type, register, unregister


def load_methods() -> None:
    """Import every method file in this package; each registers itself. Files starting with `_`
    hold shared math, and match / method / registry are the machinery: none of them is a method."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("match", "method", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


def insert_weight_adapters(gm: fx.GraphModule, layers: dict, same_tensor=None, expected: set[str] | None = None) -> int:
    """Replace each target layer's subgraph (a match of passes/match.py's LAYER_PATTERNS) by
    `call_module(slot)(x, W, b)`; a targeted nn.Parameter (kind "parameter") is routed through its
    slot wherever the graph reads it: `W -> call_module(slot)(W, W, None)`.

    `layers`: target FQN -> (its Layer, its adapter names, its methods as text), for the node's meta.
    `same_tensor(a, b)`: whether two FQNs name one tensor (tied weights). `expected`: the targets the
    graph must call (default: all); a graph of a part of the model (an encoder, a decoder step whose
    cross-attention K/V come from the cache) may lack the others. Returns the number of nodes
    replaced (a layer called twice has two)."""
    count = 0
    weight_layers = {fqn: spec[0].weight_fqn for fqn, spec in layers.items() if spec[0].kind != "parameter"}
    found = find_layer_matches(gm, weight_layers, same_tensor=same_tensor)
    for fqn, matches in found.items():
        layer = layers[fqn][0]
        for m in matches:
            m = refresh(m)  # an earlier replacement may have rewired its input
            if m.kind != layer.kind or m.transposed != layer.transposed:
                raise AdapterShapeError(
                    f"{fqn}: the graph computes it as {m.pattern.name} ({m.kind}{', weight stored (d_in, d_out)' if m.transposed else ''}), "
                    f"which does not fit its module ({layer.kind}{', transposed' if layer.transposed else ''}); "
                    f"exclude it from `targets`.")
            with gm.graph.inserting_before(m.node):
                new = gm.graph.call_module(slot_target(fqn), (m.x, m.slot_weight, m.bias))
            new.meta.update(m.node.meta)
            new.meta["adapter"] = (*layers[fqn][1:], fqn)
            new.meta["ac_pattern"] = m.pattern.name
            m.node.replace_all_uses_with(new)
            _erase_unused([m.node, m.op, *[a for a in m.op.args if isinstance(a, fx.Node)]])
            count += 1
    for fqn, (layer, *rest) in layers.items():
        if layer.kind != "parameter":
            continue
        reads = find_tensor_reads(gm, layer.fqn, same_tensor)
        for node in reads:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(slot_target(fqn), (node, node, None))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
            new.meta["adapter"] = (*rest, fqn)
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            count += 1
        if reads:
            found[fqn] = reads
    COUNTERS["weight_adapters_inserted"] += count
    missing = [f for f in (layers if expected is None else expected) if f not in found]
    if missing:
        raise AdapterError(_why_missing(gm, missing, layers, same_tensor))
    return count


def _erase_unused(nodes) -> None:
    """Erase the nodes of a replaced match that nothing reads any more (users before producers)."""
    for node in dict.fromkeys(nodes):
        if node.op in ("call_function", "call_method") and not node.users and not node._erased:
            node.graph.erase_node(node)


def _why_missing(gm: fx.GraphModule, missing: list[str], layers: dict, same_tensor) -> str:
    """Why targets were not found in the captured graph, from what the matcher did see there."""
    same = same_tensor or (lambda a, b: a == b)
    seen = survey(gm, lambda path: _value(gm, path))
    lines = []
    for fqn in missing[:5]:
        path = layers[fqn][0].weight_fqn
        reads = [c for c in seen if c.weight is not None and same(c.weight, path)]
        odd = [c for c in reads if c.reason]
        other = [c for c in reads if not c.reason]
        if odd:
            lines.append(f"{fqn}: its weight is read by {odd[0].op} ({odd[0].reason})")
        elif other:
            lines.append(f"{fqn}: its weight is used only by the layer ops of {sorted({str(c.module) for c in other})} "
                         f"(a tied weight is adapted in its own module's ops only)")
        else:
            lines.append(f"{fqn}: never called in the model's forward with these inputs")
    return ("targets exist in the model but no adapter could be wired into the captured graph: "
            + "; ".join(lines) + ". Drop them from `targets` (see `adapt-compiler inspect --unmatched`).")


def _value(gm: fx.GraphModule, path: str):
    try:
        return gm.get_parameter(path)
    except AttributeError:
        try:
            return gm.get_buffer(path)
        except AttributeError:
            return None


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
