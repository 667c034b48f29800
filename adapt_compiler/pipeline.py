"""The compiler's pipeline, one step per line: a captured base graph in, a callable out.

    captured = capture(model, args, kwargs, training)      # torch.export (non-strict) of the frozen base
    gm = build(captured, table, variant)                   # the adapter passes and the plan, below
    fn = lower(gm, how, table, verify)                     # torch.compile (Inductor, on a copy with known
                                                           # compiler bugs worked around) or the FX graph
                                                           # as is; its first call checked against the FX graph

`build` runs, on a fresh copy of the captured graph (the captured graph itself is never changed):

    1. root the copy at the frozen base tensors (by FQN) and the adapters' modules
    2. redirect_saved_modules      modules_to_save reads -> the active adapter's copy
    3. insert_weight_adapters      each target layer op -> call_module(its AdapterSlot)
    4. graph-method rewrites       Llama-Adapter at SDPA, X-LoRA's dual pass (each method's `rewrite`)
    5. plan_layers                 evaluation order, kernel, mixed-batch implementation: node kwargs
    6. batch_parameter_transforms  one call for the parameter-only part of many layers
    7. lint

Variants of one capture: "adapted" (all steps), "mixed" (one adapter per sample: steps 1-5 with
mixed-batch implementations, no batching), "merged" (steps 1-2: the frozen tensors hold the merged
weights), "disabled" (step 1: the base model). The table (`table.py`) is everything the steps read;
the AdaptedModule keeps the user-facing API and the cache of what this returns. ADAPT_COMPILER_DEBUG=1
prints the graph after each step.
"""

from __future__ import annotations

import copy
import os

from torch import fx, nn

from .capture import Captured, capture
from .names import SAVED, SLOTS, graph_target
from .passes import GraphMethod, insert_weight_adapters, method_for, redirect_saved_modules
from . import lowering
from .lowering.batching import batch_parameter_transforms
from .lowering.guard import guard
from .lowering.plan import plan_layers
from .lowering.workarounds import for_inductor
from .table import AdapterTable

VARIANTS = ("adapted", "mixed", "merged", "disabled")

__all__ = ["VARIANTS", "build", "capture", "lower"]


def build(captured: Captured, table: AdapterTable, variant: str) -> fx.GraphModule:
    """The graph of one variant of one capture (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    training = captured.training
    gm = _rooted_copy(captured, table)  # 1
    if variant != "disabled" and len(table.saved):
        redirect_saved_modules(gm, {s.fqn: tuple(s.copies) for s in table.saved.values()})  # 2
        _debug_print(gm, "redirect_saved_modules", variant)
    if variant in ("adapted", "mixed"):
        layers = {s.layer.fqn: (tuple(s.methods), ",".join(sorted({m.name for m in s.methods.values()})))
                  for s in table.slots.values()}
        if layers:
            insert_weight_adapters(gm, layers)  # 3
            _debug_print(gm, "insert_weight_adapters", variant)
        for name, spec in table.specs.items():  # 4
            method = method_for(spec)
            if isinstance(method, GraphMethod):
                method.rewrite(gm, table, name, captured)
                _debug_print(gm, f"{method.name}.rewrite", variant)
        if plan_layers(gm, table.specs, training, mixed=variant == "mixed"):  # 5
            _debug_print(gm, "plan_layers", variant)
        if variant == "adapted" and batch_parameter_transforms(gm, table.specs, table.state, training):  # 6
            _debug_print(gm, "batch_parameter_transforms", variant)
    gm.graph.lint()  # 7
    gm = fx.GraphModule(gm, gm.graph)  # keeps only what the final graph references
    gm.meta["ac_variant"], gm.meta["ac_training"] = variant, training
    return gm


def lower(gm: fx.GraphModule, how, table: AdapterTable, verify: bool = True):
    """The callable that runs `gm`: compiled as `how` says. Unless `how` is "eager" or `verify` is
    off, its first call is checked against the FX graph itself (lowering/guard.py), and a graph
    that disagrees falls back to eager with a warning."""
    if how == "eager":
        return gm
    compiled_graph = for_inductor(gm) if how in ("inductor", "regional") else gm  # known Inductor bugs, worked around
    if not verify:
        return lowering.lower(compiled_graph, how)
    # the compiled graph draws the same random numbers as the eager one (aten's generator), so
    # the check can compare training graphs with dropout, and a seed gives PEFT's masks
    options = {"fallback_random": True}
    what = f"{type(table.model).__name__} ({'train' if gm.meta['ac_training'] else 'eval'}, {gm.meta['ac_variant']})"
    return guard(
        gm, lowering.lower(compiled_graph, how, options), lowering.lowering_name(how),
        tensors=lambda: [(f"{a}:{where}.{p}", t) for a, where, p, t in table.tensors()],
        buffers=lambda: [t for t in table.frozen.values() if not isinstance(t, nn.Parameter)],
        fallbacks=[("eager", lambda: gm)],
        what=what,
    )


def _rooted_copy(captured: Captured, table: AdapterTable) -> fx.GraphModule:
    """A copy of the captured graph whose attribute paths are the model's FQNs (the frozen tensors)
    plus the adapters' modules, which the passes wire in."""
    source = captured.graph_module
    root = nn.Module()
    for node in source.graph.nodes:
        if node.op == "get_attr":
            t = table.frozen.get(node.target)
            if t is None:  # a constant export lifted (not a model tensor)
                t = _get_path(source, node.target)
            _set_path(root, node.target, t)
        elif node.op == "call_module":  # export's own helpers (e.g. _guards_fn)
            _set_path(root, node.target, source.get_submodule(node.target))
    gm = fx.GraphModule(root, copy.deepcopy(source.graph))
    gm.add_submodule(SLOTS, table.slots)
    gm.add_submodule(SAVED, table.saved)
    for name, holder in table.graph_adapters.items():
        gm.add_submodule(graph_target(name), holder)
    return gm


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: nn.Module, path: str, value) -> None:
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


def _debug_print(gm: fx.GraphModule, step: str, variant: str) -> None:
    """ADAPT_COMPILER_DEBUG=1 prints the graph after each step that changed it."""
    if os.environ.get("ADAPT_COMPILER_DEBUG"):
        print(f"===== after {step} ({variant}) =====")
        print(gm.graph)
