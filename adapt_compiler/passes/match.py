"""The pattern matcher: which graph node computes which target module, and what kind of layer it is.

Nodes are matched by FQN, not by position: the module path comes from the node's
`nn_module_stack` (so tied weights, e.g. GPT-2's wte/lm_head, still resolve to the right module),
falling back to the weight's get_attr target.
"""

from __future__ import annotations

import torch
from torch import fx, nn

import torch.nn.functional as F

from ..errors import AdapterShapeError
from ..quant import describe as describe_quantized
from ..quant import kind_of as quantized_kind
from ..quant import op_kinds
from .method import Layer

aten = torch.ops.aten

# The layer ops a weight adapter replaces, as data: op -> (weight index, activation index, bias
# index). ATen overloads are what torch.export captures; the torch-level functions are what Dynamo
# hands a torch.compile backend (lowering/backend.py), so both front ends share one matcher.
LAYER_OPS = {
    aten.linear.default: (1, 0, 2),
    aten.addmm.default: (2, 1, 0),  # HF Conv1D: addmm(bias, x2d, W[d_in, d_out])
    aten.conv2d.default: (1, 0, 2),
    aten.embedding.default: (0, 1, None),
    torch._C._nn.linear: (1, 0, 2),
    F.linear: (1, 0, 2),
    torch.addmm: (2, 1, 0),
    F.conv2d: (1, 0, 2),
    torch.conv2d: (1, 0, 2),
    F.embedding: (1, 0, None),  # F.embedding(input, weight)
}
_ARG_NAMES = {"input": 0, "weight": 1, "bias": 2}  # F.linear / F.conv2d keyword forms


def _arg(node: fx.Node, index: int | None):
    if index is None:
        return None
    if len(node.args) > index:
        return node.args[index]
    name = {v: k for k, v in _ARG_NAMES.items()}.get(index)
    return node.kwargs.get(name) if name and node.target in (F.linear, F.conv2d, torch._C._nn.linear) else None


# The quantized layers' ops (quant/): op(x, bias, *operands, *constants). Their "weight" is the
# tuple of operands and constants, which the slot wraps into a QuantizedWeight.
QUANT_LAYER_OPS = op_kinds()


def is_layer_op(target) -> bool:
    return target in LAYER_OPS or target in QUANT_LAYER_OPS


def layer_operands(node: fx.Node):
    """(activation, weight, bias) argument nodes of a layer op in LAYER_OPS (bias may be None); for a
    quantized layer's op, weight is the tuple of its operands and constants."""
    if node.target in QUANT_LAYER_OPS:
        return node.args[0], tuple(node.args[2:]), node.args[1]
    w_idx, x_idx, b_idx = LAYER_OPS[node.target]
    return _arg(node, x_idx), _arg(node, w_idx), _arg(node, b_idx)


_LINEAR_OPS = (aten.linear.default, torch._C._nn.linear)  # F.linear is torch._C._nn.linear
_CONV1D_OPS = (aten.addmm.default, torch.addmm)
_CONV2D_OPS = (aten.conv2d.default, torch.conv2d)  # F.conv2d is torch.conv2d
_EMBEDDING_OPS = (aten.embedding.default, F.embedding)
# the geometry arguments after (input, weight, bias): conv2d(x, W, b, stride, padding, dilation, groups),
# the same positions and names in F.conv2d and aten.conv2d
_CONV2D_OPTIONS = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))


def _option(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def layer_from_node(fqn: str, node: fx.Node, weight: torch.Tensor, has_bias: bool) -> Layer:
    """The method-facing description of a layer op (a node whose target is in LAYER_OPS), read off
    the op itself: `weight` is the value its weight argument holds (model layout, for shape and
    dtype); conv stride/padding/dilation/groups and embedding padding_idx/max_norm are the op's own
    arguments. The graph counterpart of `describe_layer` (which reads an nn.Module)."""
    common = dict(fqn=fqn, has_bias=has_bias, dtype=weight.dtype)
    target = node.target
    if target in _LINEAR_OPS:
        return Layer(kind="linear", weight_shape=tuple(weight.shape), **common)
    if target in _CONV1D_OPS:  # HF Conv1D: addmm(b, x2d, W[d_in, d_out]); canonical (d_out, d_in)
        return Layer(kind="linear", weight_shape=(weight.shape[1], weight.shape[0]), transposed=True, **common)
    if target in _CONV2D_OPS:
        stride, padding, dilation, groups = (_option(node, i, name, d) for name, i, d in _CONV2D_OPTIONS)
        return Layer(
            kind="conv2d",
            weight_shape=tuple(weight.shape),
            stride=_pair(stride),
            padding=padding if isinstance(padding, str) else _pair(padding),
            dilation=_pair(dilation),
            groups=int(groups),
            **common,
        )
    if target is F.embedding:  # F.embedding(input, weight, padding_idx, max_norm, ...)
        return Layer(
            kind="embedding",
            weight_shape=tuple(weight.shape),
            padding_idx=_option(node, 2, "padding_idx", None),
            max_norm=_option(node, 3, "max_norm", None),
            **common,
        )
    if target is aten.embedding.default:  # aten.embedding(weight, indices, padding_idx=-1, ...)
        padding_idx = _option(node, 2, "padding_idx", -1)
        return Layer(kind="embedding", weight_shape=tuple(weight.shape),
                     padding_idx=None if padding_idx == -1 else padding_idx, **common)
    raise AdapterShapeError(f"{fqn}: {node.target} is not a layer op adapters attach to ({node.format_node()}).")


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind a weight method can adapt, or None. A quantized layer of a kind we do not know
    (GPTQ, AWQ, HQQ, ...) raises an AdapterError naming its class and the supported quantizations."""
    if quantized_kind(module) is not None:  # bitsandbytes / torchao linears (quant/)
        return "linear"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def describe_layer(fqn: str, module: nn.Module, quant=None, default_dtype=torch.float32) -> Layer:
    """The method-facing description of a module (canonical weight layout). A quantized layer is
    described by its QuantInfo (`quant`, else read from the module): its true (out, in) shape and the
    unquantized weight's dtype, never the packed storage's (`default_dtype`: the model's float dtype,
    for kinds that do not record it)."""
    quant = quant if quant is not None else describe_quantized(module, default_dtype)
    if quant is not None:
        return Layer(fqn=fqn, kind="linear", weight_shape=(quant.out_features, quant.in_features),
                     has_bias=getattr(module, "bias", None) is not None, dtype=quant.dtype, quant=quant)
    w = module.weight
    common = dict(fqn=fqn, has_bias=getattr(module, "bias", None) is not None, dtype=w.dtype)
    if isinstance(module, nn.Linear):
        return Layer(kind="linear", weight_shape=tuple(w.shape), **common)
    if layer_kind(module) == "linear":  # HF Conv1D
        return Layer(kind="linear", weight_shape=(w.shape[1], w.shape[0]), transposed=True, **common)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
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


def _get_attr_path(node: fx.Node) -> str | None:
    return node.target if node.op == "get_attr" else None


def find_layer_nodes(
    gm: fx.GraphModule, fqns: set[str], weight_path=_get_attr_path, module_fqn=node_module_fqn
) -> dict[str, list[fx.Node]]:
    """For each target FQN, the layer-op nodes that compute it (one per call of the module).

    `weight_path(node)`: the FQN of the tensor a weight argument node reads, or None if it is not
    a model tensor (captured graphs: get_attr targets; Dynamo graphs: placeholder sources).
    `module_fqn(node)`: the FQN of the module whose forward made the op, or None (captured graphs:
    `nn_module_stack`; Dynamo graphs spell that stack as source expressions)."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not is_layer_op(node.target):
            continue
        weight = layer_operands(node)[1]
        if isinstance(weight, tuple):  # a quantized layer: its first operand is `<fqn>.weight[__...]`
            weight = weight[0]
        path = weight_path(weight) if isinstance(weight, fx.Node) else None
        if path is None:
            continue
        fqn = module_fqn(node)
        if fqn not in fqns:
            fqn = path.rsplit(".", 1)[0]
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
