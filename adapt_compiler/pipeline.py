"""The compiler's pipeline, one step per line: a captured base graph in, a callable out.

    captured = capture(model, args, kwargs, training)      # torch.export (non-strict) of the frozen base
    gm = build(captured, table, variant)                   # the adapter passes and the plan, below
    fn = lower(gm, how, table, verify)                     # torch.compile (Inductor, on a copy with known
                                                           # compiler bugs worked around) or the FX graph
                                                           # as is; its first call checked against the FX graph
                                                           # (lower_flat: the same over flat leaves, for
                                                           # calls that carry a KV cache)

`build` runs, on a fresh copy of the captured graph (the captured graph itself is never changed):

    1. root the copy at the frozen base tensors (by FQN) and the adapters' modules
    2. redirect_saved_modules      modules_to_save reads -> the active adapter's copy
    3. insert_pool, insert_weight_adapters
                                   the serving pool's banks after each pool layer (if reserved); each
                                   target layer op -> call_module(its AdapterSlot)
    4. graph-method rewrites       Llama-Adapter at SDPA, X-LoRA's dual pass (each method's `rewrite`)
    5. plan_layers                 evaluation order, kernel, mixed-batch implementation: node kwargs
    6. batch_parameter_transforms  one call for the parameter-only part of many layers
    7. checkpoint_blocks           training graphs: chosen repeated blocks recompute in the backward
    8. lint

Variants of one capture: "adapted" (all steps), "mixed" (one adapter per sample: steps 1-5 with
mixed-batch implementations, no batching), "merged" (steps 1-2: the frozen tensors hold the merged
weights; a layer whose weight is tied to another module's keeps its slot: steps 3 and 5 for it),
"disabled" (step 1: the base model). The table (`table.py`) is everything the steps read;
the AdaptedModule keeps the user-facing API and the cache of what this returns. ADAPT_COMPILER_DEBUG=1
prints the graph after each step.
"""

from __future__ import annotations

import copy
import os

from torch import fx, nn

from .capture import Captured
from .capture import capture as _capture
from .names import POOL, SAVED, SLOTS, attach, graph_target
from .passes import GraphMethod, insert_weight_adapters, method_for, redirect_saved_modules
from . import lowering
from .lowering import half_gemm, prewarm
from .lowering.auto import EagerUntilCompiled, no_background_compile
from .lowering.batching import batch_parameter_transforms
from .lowering.gemv import decode_options
from .lowering.guard import TrimAfterFirstStep, guard
from .lowering.merge import tied_layers
from .lowering.plan import plan_layers
from .lowering.pool import insert_pool
from .lowering.recompute import checkpoint_blocks
from .lowering.step import FlatStep
from .lowering.workarounds import for_inductor
from .table import AdapterTable

VARIANTS = ("adapted", "mixed", "merged", "disabled")

__all__ = ["VARIANTS", "build", "capture", "lower", "lower_flat"]


def capture(*args, **kwargs) -> Captured:
    """capture.capture, never while a graph compiles in the background (lowering/auto.py: torch.export
    and Dynamo share a process-wide flag)."""
    with no_background_compile():
        return _capture(*args, **kwargs)


def build(captured: Captured, table: AdapterTable, variant: str, expects=None) -> fx.GraphModule:
    """The graph of one variant of one capture (see the module docstring). `expects(fqn)`: whether the
    capture must run that target layer (it is a part of the model, e.g. an encoder); None: every one."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    training = captured.training
    gm = _rooted_copy(captured, table)  # 1
    if variant != "disabled" and len(table.saved):
        redirect_saved_modules(gm, {s.fqn: tuple(s.copies) for s in table.saved.values()})  # 2
        _debug_print(gm, "redirect_saved_modules", variant)
    if variant == "merged" and (tied := tied_layers(table)):
        # a layer sharing its weight with another module is not folded (lowering/merge.py): its slot stays
        insert_weight_adapters(gm, _slot_layers(table, tied), table.same_tensor)  # 3, tied layers only
        plan_layers(gm, table.specs, training)  # 5
        _debug_print(gm, "insert_weight_adapters (tied layers)", variant)
    if variant in ("adapted", "mixed"):
        if table.pool is not None:  # 3a: the serving pool's slots, indexed per sample (lowering/pool.py)
            insert_pool(gm, table.pool)
            _debug_print(gm, "insert_pool", variant)
        layers = _slot_layers(table)
        if layers:
            insert_weight_adapters(gm, layers, table.same_tensor,
                                   None if expects is None else {f for f in layers if expects(f)})  # 3
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
    if training and checkpoint_blocks(gm, table.model, table.recompute):  # 7
        _debug_print(gm, "checkpoint_blocks", variant)
    gm.graph.lint()  # 8
    gm = fx.GraphModule(gm, gm.graph)  # keeps only what the final graph references
    gm.meta["ac_variant"], gm.meta["ac_training"] = variant, training
    return gm


def _slot_layers(table: AdapterTable, only=None) -> dict:
    """FQN -> (Layer, adapter names, methods as text) of every adapted layer (or those in `only`)."""
    return {s.layer.fqn: (s.layer, tuple(s.methods), ",".join(sorted({m.name for m in s.methods.values()})))
            for s in table.slots.values() if only is None or s.layer.fqn in only}


def lower(gm: fx.GraphModule, how, table: AdapterTable, verify: bool = True, options: dict | None = None):
    """The callable that runs `gm`: compiled as `how` says. Unless `how` is "eager" or `verify` is
    off, its first call is checked against the FX graph itself (lowering/guard.py), and a graph
    that disagrees falls back to eager with a warning. "auto": `gm` itself serves the calls until
    the "inductor" lowering of it is compiled in the background; then that does (first call checked).
    `options`: Inductor config for this graph (lower_flat's one-row decode options)."""
    budget = None if table.recompute.by_blocks else table.recompute.memory_budget
    if how == "eager":
        return lowering.lower(gm, how, memory_budget=budget)
    # known Inductor bugs, worked around
    compiled_graph = for_inductor(gm) if how in ("inductor", "regional", "auto") else gm
    what = f"{type(table.model).__name__} ({'train' if gm.meta['ac_training'] else 'eval'}, {gm.meta['ac_variant']})"
    # the compiled graph draws the same random numbers as the eager one (aten's generator), so
    # the check can compare training graphs with dropout, and a seed gives PEFT's masks; "auto"
    # always does, so a run's numbers do not change when it switches from eager to compiled
    options = {**({"fallback_random": True} if verify or how == "auto" else {}), **(options or {})} or None
    if how in ("inductor", "regional", "auto"):  # half-precision products on a CPU slow for them
        options = half_gemm.inductor_options(gm, options)
    prewarm.wait()  # Inductor's CPU set-up, started at the capture (lowering/prewarm.py)
    compiled = lowering.lower(compiled_graph, how, options, memory_budget=budget)
    served = TrimAfterFirstStep(compiled) if not verify else guard(
        gm, compiled, lowering.lowering_name("inductor" if how == "auto" else how),
        tensors=lambda: [(f"{a}:{where}.{p}", t) for a, where, p, t in table.tensors()],
        buffers=lambda: [t for t in table.frozen.values() if not isinstance(t, nn.Parameter)],
        fallbacks=[("eager", lambda: gm)],
        what=what,
        # a warm start's saved verdicts (compile_cache.py); "auto" compiles in a background thread, where
        # this call's cache hits and misses cannot be told apart from the thread's: always checked
        reuse=table.verified if how in ("inductor", "regional") else None,
        options=options,
    )
    if how == "auto":  # eager calls until a background thread has compiled it (lowering/auto.py)
        return EagerUntilCompiled(gm, compiled, served, what)
    return served


def lower_flat(gm: fx.GraphModule, how, table: AdapterTable, verify: bool = True) -> FlatStep:
    """`lower`, for a graph called with stateful containers (a KV cache): the compiled code takes and
    returns flat tensors, and the containers are handled outside it (lowering/step.py). A static
    decode step whose linear layers see one row computes them as fused reductions (lowering/gemv.py)."""
    step = FlatStep(gm)
    step.fn = lower(step.gm, how, table, verify, decode_options(step.gm))
    return step


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
            attach(root, node.target, t)
        elif node.op == "call_module":  # export's own helpers (e.g. _guards_fn)
            attach(root, node.target, source.get_submodule(node.target))
    gm = fx.GraphModule(root, copy.deepcopy(source.graph))
    gm.add_submodule(SLOTS, table.slots)
    gm.add_submodule(SAVED, table.saved)
    if table.pool is not None:
        gm.add_submodule(POOL, table.pool.banks)
    for name, holder in table.graph_adapters.items():
        gm.add_submodule(graph_target(name), holder)
    return gm


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _debug_print(gm: fx.GraphModule, step: str, variant: str) -> None:
    """ADAPT_COMPILER_DEBUG=1 prints the graph after each step that changed it."""
    if os.environ.get("ADAPT_COMPILER_DEBUG"):
        print(f"===== after {step} ({variant}) =====")
        print(gm.graph)
