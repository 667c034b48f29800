"""The tracer: torch.export (non-strict) of the frozen base model, one graph per mode and input structure.

Batch and sequence dims are `Dim.AUTO`, so one capture serves every batch size and length; dims
that export specialises (e.g. an image's height) are recorded and checked on every call, and a
call that does not fit triggers a new capture instead of a wrong answer.

Keyword inputs: any keyword the model's forward accepts, including ones that land in its
`**kwargs` (HF's `num_items_in_batch`, `output_hidden_states`, ...). Python scalars (bools, ints,
floats, strings, None) are part of the capture's key by value: a model may branch on them, or on
their type (Llama's `logits_to_keep` is a count as an int and an index tensor otherwise, so a
symbolic int would silently select instead of slice). Scalars whose value never changes the
graph are passed as tensors instead, before they reach this module (integrations/hf_model.py,
`lift_scalar_inputs`), so their values share one capture.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.fx.config
from torch import fx, nn
from torch.export import Dim
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .quant import describe as describe_quantized
from .quant import is_operand_key, known_layers, name_operands, operand_key, quantized_leaves


@dataclass
class Captured:
    """One captured graph of the base model and the input signature it serves."""

    graph_module: fx.GraphModule  # plain GraphModule; params are the model's own objects (get_attr by FQN)
    in_spec: pytree.TreeSpec
    static_dims: tuple[tuple[tuple[int, int], ...], ...]  # per flat input: ((dim, size), ...) export fixed
    training: bool
    root: str = ""  # the submodule captured ("" = the whole model); get_attr targets are full FQNs anyway


@dataclass(frozen=True)
class InputRule:
    """How capture treats calls that carry one kind of input (a KV cache, ...): an extension point that
    the integrations fill (integrations/kv_cache.py), so this file knows no input kind by name.

    `finds(args, kwargs)`: does this call carry the input? (It may register pytree nodes, so it runs
    before anything is flattened.) `key(args, kwargs)`: what else tells two calls' graphs apart (e.g.
    prefill vs decode), added to the structure key. `dynamic_shapes(arguments, default)`: the export
    spec per named argument, given the default spec function for one value. `flat`: graphs of such
    calls are compiled over their flat leaves (lowering/step.py). `memo(args, kwargs)`: a cheap key
    under which a call's graph may be found again without flattening it (None: no shortcut), valid
    while the objects it names by identity live; e.g. one static KV cache's decode steps."""

    name: str
    finds: Callable[[tuple, dict], bool]
    key: Callable[[tuple, dict], Hashable]
    dynamic_shapes: Callable[[dict, Callable[[Any], Any]], dict]
    flat: bool = False
    memo: Callable[[tuple, dict], Hashable | None] | None = None


INPUT_RULES: list[InputRule] = []


def register_input_rule(rule: InputRule) -> None:
    if all(r.name != rule.name for r in INPUT_RULES):
        INPUT_RULES.append(rule)


def _rules_for(args: tuple, kwargs: dict) -> list[InputRule]:
    return [r for r in INPUT_RULES if r.finds(args, kwargs)]


def memo_key(args: tuple, kwargs: dict):
    """(the rule's memo key, the objects it names) for a call a rule can find again cheaply, else None."""
    for rule in INPUT_RULES:
        if rule.memo is not None:
            found = rule.memo(args, kwargs)
            if found is not None:
                return (rule.name, found[0]), found[1]
    return None


def compiled_flat(args: tuple, kwargs: dict) -> bool:
    """Whether graphs of this call are compiled over flat leaves (an input rule says so)."""
    return any(r.flat for r in _rules_for(args, kwargs))


def signature(args: tuple, kwargs: dict):
    """The structure key of a call: pytree spec plus tensor ranks and dtypes (not sizes), plus what
    the input rules that apply add."""
    extra = tuple((r.name, r.key(args, kwargs)) for r in _rules_for(args, kwargs))
    flat, spec = pytree.tree_flatten((args, kwargs))
    leaves = tuple((tuple(x.shape).__len__(), x.dtype) if isinstance(x, torch.Tensor) else ("py", x) for x in flat)
    return (spec, leaves, extra) if extra else (spec, leaves)


def fits(captured: Captured, args: tuple, kwargs: dict) -> bool:
    flat, _ = pytree.tree_flatten((args, kwargs))
    for x, static in zip(flat, captured.static_dims):
        if isinstance(x, torch.Tensor):
            for dim, size in static:
                if x.shape[dim] != size:
                    return False
    return True


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    """Put the model in the capture mode and restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    def dims(x):
        if isinstance(x, torch.Tensor):
            # batch and sequence (or the first two dims of whatever the model takes) are dynamic
            return {d: Dim.AUTO for d in range(min(x.dim(), 2))}
        return None

    def tree(v):
        return pytree.tree_map(dims, v, is_leaf=lambda t: isinstance(t, torch.Tensor))

    rules = _rules_for(args, kwargs)
    if not kwargs and not rules:
        return tuple(tree(a) for a in args)
    # with keyword inputs export wants one dict keyed by the forward's parameter names
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    for rule in rules:
        return rule.dynamic_shapes(dict(bound.arguments), tree)
    return {name: tree(value) for name, value in bound.arguments.items()}


def _explain(model: nn.Module, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    first = text.strip().splitlines()[0][:400] if text.strip() else type(err).__name__
    where = ""
    m = re.findall(r'File "([^"]+)", line (\d+)', text)
    if m:
        where = f" (at {m[-1][0]}:{m[-1][1]})"
    hints = []
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False) or "cache" in text.lower():
        hints.append("pass use_cache=False (or set model.config.use_cache = False)")
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        hints.append("avoid Python control flow on tensor values in forward, or mark the module as a leaf")
    hints.append("check that model(*args, **kwargs) runs eagerly with these inputs")
    return (
        f"could not capture {type(model).__name__} with torch.export (non-strict){where}: {first}. "
        f"Fix: {'; '.join(hints)}."
    )


def check_arguments(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise a CaptureError naming an input the model's forward does not take (before export turns
    it into an unreadable trace)."""
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as err:
        names = [p for p in inspect.signature(model.forward).parameters]
        raise CaptureError(
            f"{type(model).__name__}.forward does not take these inputs: {err}. It takes: {', '.join(names)}. "
            f"Fix: pass only inputs the model accepts (with transformers.Trainer: remove the column, or set "
            f"label_names to the model's label argument)."
        ) from None


def _exportable(model: nn.Module, kwargs: dict) -> nn.Module:
    """`model`, or, when some keywords go to its `**kwargs`, a shallow alias of it whose forward
    names them. torch.export (2.13) lays `**kwargs` entries out twice when it matches dynamic
    shapes to inputs ("Must provide a tree_name when there might be a mismatch"); a forward that
    names every keyword has no `**kwargs` to lay out. The alias shares the model's submodules,
    parameters and hooks (same dicts), so the graph's FQNs are the model's; the model itself is
    not touched."""
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    named = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    extra = [k for k in kwargs if k not in named]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in params):
        return model
    flat = [p for p in params if p.kind is not p.VAR_KEYWORD]
    flat += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    alias = copy.copy(model)  # a new object over the same __dict__ values
    forward = model.forward

    def named_forward(*a, **k):
        return forward(*a, **k)

    named_forward.__signature__ = sig.replace(parameters=flat)
    alias.forward = named_forward
    return alias


@contextlib.contextmanager
def _without_stack_traces():
    """torch.export records the Python stack of every node it traces (node.meta["stack_trace"]: a traceback
    extracted and symbolized per node), 0.7-1 s of a 6.3 s capture of a 24-layer Llama. Nothing here reads it,
    and a failed capture's error carries its own traceback; ADAPT_COMPILER_DEBUG=1 keeps it, for reading
    graphs."""
    if os.environ.get("ADAPT_COMPILER_DEBUG"):
        yield
        return
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def capture(model: nn.Module, args: tuple, kwargs: dict, training: bool, tensors: dict | None = None,
            root: str = "", quant: dict | None = None) -> Captured:
    """Export `model` in the given mode. Never changes the model: its mode flags are restored, and
    `tensors` (FQN -> the frozen tensors the graph will run with, e.g. after `m.half()`) stand in
    for its parameters and buffers only while it is traced, so the graph bakes their dtypes and
    devices in, not those of the user's tensors. `root`: capture only that submodule (e.g. the
    backbone `"model"` of a causal LM); the graph still names tensors by their FQN in `model`.

    Quantized layers (quant/): each is traced as one op over its operands, named `<fqn>.weight` and
    `<fqn>.weight__<operand>` in the graph. `quant` (FQN -> QuantInfo) and the operands in `tensors`
    are what the AdaptedModule read at compile time; without them they are read from the model."""
    args, kwargs = tuple(args), dict(kwargs)
    target = model.get_submodule(root) if root else model
    check_arguments(target, args, kwargs)
    if root:
        tensors = {k[len(root) + 1:]: v for k, v in tensors.items() if k.startswith(root + ".")} if tensors else tensors
        quant = {k[len(root) + 1:]: v for k, v in quant.items() if k.startswith(root + ".")} if quant else quant
    infos, operands = _quantized(target, tensors, quant)
    params = {k: v for k, v in tensors.items() if not is_operand_key(k)} if tensors else None
    swapped = _reparametrize_module(target, params) if params else contextlib.nullcontext()
    with _mode(model, training), swapped, quantized_leaves(target, infos, operands), _without_stack_traces():
        try:
            exported = _exportable(target, kwargs)
            ep = torch.export.export(exported, args, kwargs, strict=False,
                                     dynamic_shapes=_dynamic_shapes(exported, args, kwargs))
        except Exception as err:  # noqa: BLE001 - re-raised with the module and the fix
            raise CaptureError(_explain(target, err)) from err
    unlifted = ep.module()
    if infos:
        name_operands(unlifted, infos, operands)
    unlifted = _rooted_at(unlifted, root)
    # a plain GraphModule (export's wrapper refuses train()/eval()); keeps the pytree codegen
    gm = fx.GraphModule(unlifted, unlifted.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static = []
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            static.append(tuple((d, int(s)) for d, s in enumerate(val.shape) if isinstance(s, int)))
        else:
            static.append(())
    _, in_spec = pytree.tree_flatten((args, kwargs))
    return Captured(gm, in_spec, tuple(static), training, root)


def _rooted_at(unlifted: fx.GraphModule, root: str) -> fx.GraphModule:
    """A submodule's graph with every get_attr target and nn_module_stack path prefixed by the
    submodule's path, so that the pipeline finds the frozen tensors, adapter slots and modules by
    their FQN in the whole model."""
    if not root:
        return unlifted
    holder = nn.Module()
    parent = holder
    *parents, leaf = root.split(".")
    for part in parents:
        parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, unlifted)
    graph = unlifted.graph
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            node.target = f"{root}.{node.target}"
        stack = node.meta.get("nn_module_stack")
        if stack:  # which module made each op, by its FQN in the whole model (the matcher reads it)
            node.meta["nn_module_stack"] = {k: (f"{root}.{path}" if path else root, *rest)
                                            for k, (path, *rest) in stack.items()}
    return fx.GraphModule(holder, graph)  # the same Graph object: its pytree calling convention stays


def _quantized(model: nn.Module, tensors: dict | None, quant: dict | None):
    """(FQN -> QuantInfo, FQN -> operand name -> tensor) of the model's quantized layers."""
    from .quant import KINDS

    # the model's modules are walked only when the caller did not say what it read at compile time
    layers = known_layers(model) if quant is None or not tensors else None
    infos = dict(quant) if quant is not None else {fqn: describe_quantized(mod) for fqn, mod in layers.items()}
    operands = {}
    for fqn, info in infos.items():
        live = None
        operands[fqn] = {}
        for name in info.operands:
            key = operand_key(fqn, name)
            if tensors is not None and key in tensors:
                operands[fqn][name] = tensors[key]
            else:
                layers = layers if layers is not None else known_layers(model)
                live = live if live is not None else KINDS[info.kind].operands(layers[fqn])
                operands[fqn][name] = live[name]
    return infos, operands
