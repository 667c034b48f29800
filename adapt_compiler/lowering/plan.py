"""Plan each adapted layer of one graph: the evaluation order and implementation, on the node.

Per adapter on each slot node, the sympy cost model (`cost.py`) picks the evaluation order
(activation side vs weight side) at the graph's token count; on CUDA a plain low-rank adapter on a
Linear goes to the fused Triton kernel ("kernel"); in the mixed-batch graph each slot is served by
the multi-adapter kernel or by per-adapter selection. Every decision is written on the node it
concerns, and nowhere else:

    node.kwargs["orders"]  = {adapter: "activation" | "weight" | "kernel"}   (the slot obeys these)
    node.kwargs["training"], node.kwargs["mixed"]                          (the graph's mode / batch)
    node.meta["ac_plan"]   = {adapter: Decision}                           (cost figures, for report())

so two graphs of one mode (two sequence lengths, two input structures) keep their own choices,
and a compiled graph never sees another graph's choice change under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from ..counters import COUNTERS
from ..names import SLOTS
from . import cost, kernels
from .mixed import mixed_impl

PLAN = "ac_plan"


@dataclass(frozen=True)
class Decision:
    """What the plan chose for one adapter on one layer of one graph, and why."""

    adapter: str
    method: str
    fqn: str
    order: str  # "activation" | "weight" | "kernel"
    choice: cost.OrderChoice  # the FLOPs compared at the graph's token count
    tokens_expr: str  # the symbolic token count of the layer's input
    mixed: str | None = None  # in the mixed-batch graph: "multi_lora" | "select"
    batched_with: int = 0  # layers whose parameter-only transform runs as one call with this one


def _hint(size) -> int:
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    return int(hint) if hint is not None else 128


def token_count(x_val, layer) -> tuple[int, str]:
    """(example token count, its symbolic expression) of a layer's input."""
    if x_val is None:
        return 128, "?"
    shape = list(x_val.shape)
    if layer.is_conv:
        dims = [shape[0], *shape[2:]]  # batch × output positions ≈ batch × input positions / stride^n
    elif layer.kind == "embedding":
        dims = shape
    else:
        dims = shape[:-1]
    expr = " * ".join(str(d) for d in dims) or "1"
    return math.prod(_hint(d) for d in dims), expr


def choose_order(method, spec, layer, tokens: int, training: bool) -> cost.OrderChoice:
    """The cheaper evaluation order of one adapter on one layer at `tokens` (or spec.order if forced).

    Over a quantized layer the weight side is for eval only: W' = dequantize(W) + ΔW is built, used
    by one GEMM and freed; in training autograd would keep W' (a full-precision copy of a quantized
    weight) until the backward, so training graphs stay on the activation side there."""
    flops = cost.with_training_and_traffic(method.cost(spec, layer, cost.TOKENS), layer, training,
                                           additive=method.merge_kind == "additive")
    allowed = ["activation"] + (["weight"] if method.weight_side_ok(spec, training) and not
                                (training and layer.quant is not None) else [])
    return cost.choose(flops, tokens, spec.order, allowed)


def slot_nodes(gm: fx.GraphModule):
    """(node, slot) for every AdapterSlot call in the graph."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(f"{SLOTS}."):
            yield node, gm.get_submodule(node.target)


def plan_layers(gm: fx.GraphModule, specs: dict, training: bool, mixed: bool = False) -> int:
    """Write each slot node's orders, mode and mixed-batch implementation (see the module docstring).
    Returns the number of slot nodes planned."""
    count = 0
    for node, slot in slot_nodes(gm):
        x = node.args[0]
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        tokens, expr = token_count(x_val, slot.layer)
        on_cuda = isinstance(x_val, torch.Tensor) and x_val.is_cuda and kernels.HAVE_TRITON
        impl = mixed_impl(slot, training) if mixed else None
        orders, decisions = {}, {}
        for name, method in slot.methods.items():
            spec = specs[name]
            choice = choose_order(method, spec, slot.layer, tokens, training)
            order = choice.order
            if order == "activation" and on_cuda and not mixed and slot.layer.quant is None and method.kernel_operands(
                    spec, slot.layer, slot.params(name), training) is not None:
                order = "kernel"  # the fused Triton LoRA kernel (kernels/fused_lora.py)
            orders[name] = order
            decisions[name] = Decision(name, method.name, slot.layer.fqn, order, choice, expr, impl)
        node.kwargs = {**node.kwargs, "orders": orders, "training": training, "mixed": impl}
        node.meta[PLAN] = decisions
        count += 1
    COUNTERS["layers_planned"] += count
    return count


def decisions_of(gm: fx.GraphModule) -> dict[tuple[str, str], Decision]:
    """(layer FQN, adapter) -> the Decision recorded on the graph (the first call of a layer)."""
    out = {}
    for node in gm.graph.nodes:
        for name, d in (node.meta.get(PLAN) or {}).items():
            out.setdefault((d.fqn, name), d)
    return out
