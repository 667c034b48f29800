"""Lowering: choose an implementation per adapter subgraph, then hand the graph to torch.compile.

Per adapter on each layer, the sympy cost model (`cost.py`) picks the evaluation order
(activation side vs weight side) at the captured graph's token count. The whole adapted graph is
then compiled with Inductor (C++ on CPU, Triton on CUDA), or run as is with lowering="eager".
On CUDA the fused Triton LoRA kernels in `kernels/` serve the LoRA subgraphs (see report()).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from . import cost

LOWERINGS = ("inductor", "eager")


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
    if layer.kind == "conv2d":
        dims = [shape[0], *shape[2:]]  # batch × output pixels ≈ batch × input pixels / stride²
    elif layer.kind == "embedding":
        dims = shape
    else:
        dims = shape[:-1]
    expr = " * ".join(str(d) for d in dims) or "1"
    return math.prod(_hint(d) for d in dims), expr


def choose_order(method, spec, layer, tokens: int, training: bool) -> cost.OrderChoice:
    """The cheaper evaluation order of one adapter on one layer at `tokens` (or spec.order if forced)."""
    flops = cost.with_training_and_traffic(method.cost(spec, layer, cost.TOKENS), layer, training,
                                           additive=method.merge_kind == "additive")
    allowed = ["activation"] + (["weight"] if method.weight_side_ok(spec, training) else [])
    return cost.choose(flops, tokens, spec.order, allowed)


def choose_orders(module, gm: fx.GraphModule) -> None:
    """Record, per slot and adapter, the cheaper evaluation order for this graph's shapes."""
    from ..slots import AdapterSlot
    from . import kernels

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        slot = gm.get_submodule(node.target)
        if not isinstance(slot, AdapterSlot):
            continue
        x = node.args[0]
        tokens, expr = token_count(x.meta.get("val") if isinstance(x, fx.Node) else None, slot.layer)
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        on_cuda = isinstance(x_val, torch.Tensor) and x_val.is_cuda
        for name, method in slot.methods.items():
            spec = module.state.specs[name]
            choice = choose_order(method, spec, slot.layer, tokens, module.training)
            orders = slot.orders_by_mode[module.training]
            orders[name] = choice.order
            if choice.order == "activation" and on_cuda and kernels.kernel_applies(method, spec, slot.layer, module.training):
                orders[name] = "kernel"  # the fused Triton LoRA kernel (kernels/fused_lora.py)
            slot.costs[name] = {"choice": choice, "tokens_expr": expr}


def lower(gm: fx.GraphModule, how: str):
    if how == "eager":
        return gm
    if how == "inductor":
        return torch.compile(gm, dynamic=None)
    raise ValueError(f"lowering={how!r} is not one of {LOWERINGS}")


def kernel_backend(device: torch.device) -> str:
    """Which implementation serves LoRA on this device (report)."""
    from . import kernels

    if device.type == "cuda":
        # fused LoRA on Linear slots (order "kernel" in the report rows), SGMV for mixed batches
        return "triton (fused_lora_linear, multi_lora)" if kernels.HAVE_TRITON else "inductor"
    return "inductor-cpp (reference ops)"
