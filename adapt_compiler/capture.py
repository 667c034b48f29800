"""The tracer: torch.export (non-strict) of the frozen base model, one graph per mode and input structure.

Batch and sequence dims are `Dim.AUTO`, so one capture serves every batch size and length; dims
that export specialises (e.g. an image's height) are recorded and checked on every call, and a
call that does not fit triggers a new capture instead of a wrong answer.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass

import torch
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


def signature(args: tuple, kwargs: dict):
    """The structure key of a call: pytree spec plus tensor ranks and dtypes (not sizes)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    leaves = tuple((tuple(x.shape).__len__(), x.dtype) if isinstance(x, torch.Tensor) else ("py", x) for x in flat)
    return spec, leaves


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

    if not kwargs:
        return tuple(tree(a) for a in args)
    # with keyword inputs export wants one dict keyed by the forward's parameter names
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
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


def capture(model: nn.Module, args: tuple, kwargs: dict, training: bool, tensors: dict | None = None,
            quant: dict | None = None) -> Captured:
    """Export `model` in the given mode. Never changes the model: its mode flags are restored, and
    `tensors` (FQN -> the frozen tensors the graph will run with, e.g. after `m.half()`) stand in
    for its parameters and buffers only while it is traced, so the graph bakes their dtypes and
    devices in, not those of the user's tensors.

    Quantized layers (quant/): each is traced as one op over its operands, named `<fqn>.weight` and
    `<fqn>.weight__<operand>` in the graph. `quant` (FQN -> QuantInfo) and the operands in `tensors`
    are what the AdaptedModule read at compile time; without them they are read from the model."""
    args, kwargs = tuple(args), dict(kwargs)
    infos, operands = _quantized(model, tensors, quant)
    params = {k: v for k, v in tensors.items() if not is_operand_key(k)} if tensors else None
    swapped = _reparametrize_module(model, params) if params else contextlib.nullcontext()
    with _mode(model, training), swapped, quantized_leaves(model, infos, operands):
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_dynamic_shapes(model, args, kwargs))
        except Exception as err:  # noqa: BLE001 - re-raised with the module and the fix
            raise CaptureError(_explain(model, err)) from err
    unlifted = ep.module()
    if infos:
        name_operands(unlifted, infos, operands)
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
    return Captured(gm, in_spec, tuple(static), training)


def _quantized(model: nn.Module, tensors: dict | None, quant: dict | None):
    """(FQN -> QuantInfo, FQN -> operand name -> tensor) of the model's quantized layers."""
    from .quant import KINDS

    layers = known_layers(model)
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
                live = live if live is not None else KINDS[info.kind].operands(layers[fqn])
                operands[fqn][name] = live[name]
    return infos, operands
