"""The pattern matcher: which graph node computes which target module, and what kind of layer it is.

Nodes are matched by FQN, not by position: the module path comes from the node's
`nn_module_stack` (so tied weights, e.g. GPT-2's wte/lm_head, still resolve to the right module),
falling back to the weight's get_attr target.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .method import Layer

aten = torch.ops.aten

# op -> (index of the weight argument, index of the activation argument, index of the bias argument)
LAYER_OPS = {
    aten.linear.default: (1, 0, 2),
    aten.addmm.default: (2, 1, 0),  # HF Conv1D: addmm(bias, x2d, W[d_in, d_out])
    aten.conv2d.default: (1, 0, 2),
    aten.embedding.default: (0, 1, None),
}


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind a weight method can adapt, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def describe_layer(fqn: str, module: nn.Module) -> Layer:
    """The method-facing description of a module (canonical weight layout)."""
    w = module.weight
    common = dict(fqn=fqn, has_bias=getattr(module, "bias", None) is not None, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        return Layer(kind="linear", weight_shape=tuple(w.shape), **common)
    if layer_kind(module) == "linear":  # HF Conv1D
        return Layer(kind="linear", weight_shape=(w.shape[1], w.shape[0]), transposed=True, **common)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            from .method import AdapterShapeError

            raise AdapterShapeError(f"{fqn}: Conv2d with padding_mode={module.padding_mode!r} is not supported.")
        return Layer(
            kind="conv2d",
            weight_shape=tuple(w.shape),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
            **common,
        )
    if isinstance(module, nn.Embedding):
        return Layer(
            kind="embedding",
            weight_shape=tuple(w.shape),
            padding_idx=module.padding_idx,
            max_norm=module.max_norm,
            **common,
        )
    raise AssertionError(type(module))


def node_module_fqn(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return None


def find_layer_nodes(gm: fx.GraphModule, fqns: set[str]) -> dict[str, list[fx.Node]]:
    """For each target FQN, the layer-op nodes that compute it (one per call of the module)."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_OPS:
            continue
        w_idx = LAYER_OPS[node.target][0]
        weight = node.args[w_idx] if len(node.args) > w_idx else None
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        fqn = node_module_fqn(node)
        if fqn not in fqns:
            fqn = weight.target.rsplit(".", 1)[0]
        if fqn in fqns:
            found.setdefault(fqn, []).append(node)
    return found


def find_param_reads(gm: fx.GraphModule, fqn: str) -> list[fx.Node]:
    """get_attr nodes that read a parameter or buffer of module `fqn` (for modules_to_save)."""
    prefix = fqn + "."
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]


def sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The attention cores of the graph, in execution order (used by graph-level methods)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
    ]
