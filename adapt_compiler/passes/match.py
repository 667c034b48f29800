"""The pattern matcher: which graph nodes compute which target layer, and what kind of layer it is.

A layer is found by what the graph computes, not by how the model's Python spells it. The table
`LAYER_PATTERNS` below lists, as data, every linear-equivalent subgraph the compiler recognises:
`aten.linear`, HF Conv1D's `addmm`, `x @ W.T` (`matmul`/`mm` against a transposed or permuted
parameter, Falcon's FalconLinear), `x @ W` against a parameter stored (d_in, d_out), the `einsum`
forms of both, each with or without a following bias add, convolutions and embeddings. Both front
ends use it: `ac.compile` on the ATen graph torch.export captures, and the torch.compile backend
(lowering/backend.py) on the torch-level graph Dynamo hands it; the table holds both spellings.

A match is assigned to a target layer by the op's own module (its `nn_module_stack`): GPT-2's
lm_head reads the tied `wte` weight, and stays lm_head's op. An op whose module is an ancestor of
the target may compute it with the target's own weight: nn.MultiheadAttention calls
`F.linear(x, self.out_proj.weight)` itself, never `out_proj.forward`.

`survey` lists what the matcher saw and could not adapt (inspect --unmatched).
"""

from __future__ import annotations

import builtins
import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AdapterShapeError
from ..quant import describe as describe_quantized
from ..quant import kind_of as quantized_kind
from ..quant import OPERAND_SEP, op_kinds
from ..spec import resolve_targets
from .method import CONV_KINDS, Layer

aten = torch.ops.aten


# -- the table: linear-equivalent subgraphs, as data ---------------------------------------------
@dataclass(frozen=True)
class Operands:
    """What a pattern reads off its anchor op: activation, weight node (model layout), bias node."""

    x: object
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool  # the weight is stored (d_in, d_out): HF Conv1D, `x @ W`
    # a quantized layer's op (quant/): its operands and constants, which the slot takes as its W
    # (`weight` is then the first operand, `<fqn>.weight`, which names the layer)
    weight_args: tuple | None = None


@dataclass(frozen=True)
class LayerPattern:
    name: str  # shown in inspect --unmatched and in errors
    kind: str  # the Layer kind it computes
    ops: frozenset  # anchor targets: ATen overloads, torch-level callables, ("method", name) for call_method
    read: Callable  # (node, is_param) -> Operands | str (why it does not apply) | None
    bias_add: bool = False  # a following `+ b` (b a parameter) belongs to the layer


def _target(node: fx.Node):
    return ("method", node.target) if node.op == "call_method" else node.target


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _direct(x: int, w: int, b: int | None, transposed: bool = False):
    """Reader of an op that takes (x, W, b) as arguments (by position, or by F.linear/F.conv*'s names)."""
    names = {0: "input", 1: "weight", 2: "bias"}

    def read(node, is_param):
        weight = _arg(node, w, names.get(w, ""))
        if not isinstance(weight, fx.Node) or not is_param(weight):
            return "its weight is computed in the graph, not a model parameter"
        bias = _arg(node, b, names.get(b, "")) if b is not None else None
        return Operands(_arg(node, x, names.get(x, "")), weight, bias if isinstance(bias, fx.Node) else None,
                        transposed)

    return read


# views that read a 2-D parameter W as Wᵀ: (op, predicate on the view's arguments after W)
_TRANSPOSE_VIEWS = {
    aten.t.default: lambda *a: True,
    aten.numpy_T.default: lambda *a: True,
    aten.transpose.int: lambda d0, d1: {d0 % 2, d1 % 2} == {0, 1},
    aten.permute.default: lambda dims: [d % 2 for d in dims] == [1, 0],
    torch.t: lambda *a: True,
    torch.transpose: lambda d0, d1: {d0 % 2, d1 % 2} == {0, 1},
    torch.permute: lambda *dims: [d % 2 for d in (dims[0] if len(dims) == 1 else dims)] == [1, 0],
    ("method", "t"): lambda *a: True,
    ("method", "transpose"): lambda d0, d1: {d0 % 2, d1 % 2} == {0, 1},
    ("method", "permute"): lambda *dims: [d % 2 for d in (dims[0] if len(dims) == 1 else dims)] == [1, 0],
    builtins.getattr: lambda name: name in ("T", "mT"),  # Dynamo's `W.T`
}


def _transposed_param(node, is_param) -> fx.Node | None:
    """W if `node` reads a parameter W as Wᵀ (t, .T, transpose, permute), else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    check = _TRANSPOSE_VIEWS.get(_target(node))
    if check is None or not node.args or not isinstance(node.args[0], fx.Node) or not is_param(node.args[0]):
        return None
    try:
        return node.args[0] if check(*node.args[1:]) else None
    except TypeError:
        return None


def _matmul(node, is_param):
    """x @ Wᵀ (W (d_out, d_in), e.g. Falcon) or x @ W (W stored (d_in, d_out))."""
    if len(node.args) != 2:
        return None
    x, w = node.args
    param = _transposed_param(w, is_param)
    if param is not None:
        return Operands(x, param, None, False)
    if isinstance(w, fx.Node) and is_param(w):
        return Operands(x, w, None, True)
    if isinstance(x, fx.Node) and (is_param(x) or _transposed_param(x, is_param) is not None):
        return "the parameter is the left operand (W @ x), not a layer applied to x"
    return None


_EINSUM_TERM = re.compile(r"^(\.\.\.)?([a-zA-Z]*)$")


def _einsum(node, is_param):
    """einsum("...i,oi->...o", x, W) (W (d_out, d_in)) or ("...i,io->...o", x, W) (stored (d_in, d_out))."""
    equation = node.args[0] if node.args else None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    x, w = operands
    if not (isinstance(w, fx.Node) and is_param(w)):
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    xs, ws = terms
    if "..." in ws or len(ws) != 2 or not _EINSUM_TERM.match(xs) or not _EINSUM_TERM.match(out):
        return "an einsum over the parameter that is not one linear layer"
    contracted = xs[-1:]
    if not contracted or contracted not in ws or contracted in out:
        return "an einsum that does not contract the activation's last dim with the parameter"
    free = ws.replace(contracted, "")
    if out != xs[:-1] + free or free in xs:
        return "an einsum whose output is not (activation dims..., out features)"
    return Operands(x, w, None, transposed=ws.index(contracted) == 0)


# The quantized layers' ops (quant/): op(x, bias, *operands, *constants), one per quantized layer while
# capture runs (quant/leaves.py)
QUANT_LAYER_OPS = op_kinds()


def _quantized_op(node, is_param):
    first = node.args[2] if len(node.args) > 2 else None
    if not isinstance(first, fx.Node) or not is_param(first):
        return "its packed weight is not a model tensor"
    bias = node.args[1]
    return Operands(node.args[0], first, bias if isinstance(bias, fx.Node) else None, False,
                    weight_args=tuple(node.args[2:]))


_LINEAR_OPS = frozenset({aten.linear.default, torch._C._nn.linear})  # F.linear is torch._C._nn.linear
_ADDMM_OPS = frozenset({aten.addmm.default, torch.addmm})
_MATMUL_OPS = frozenset({aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul,
                         ("method", "matmul"), ("method", "mm"), ("method", "__matmul__")})
_EINSUM_OPS = frozenset({aten.einsum.default, torch.einsum})
_CONV_OPS = {  # F.conv{1,2,3}d are torch.conv{1,2,3}d
    "conv1d": frozenset({aten.conv1d.default, torch.conv1d}),
    "conv2d": frozenset({aten.conv2d.default, torch.conv2d}),
    "conv3d": frozenset({aten.conv3d.default, torch.conv3d}),
}
_EMBEDDING_OPS = frozenset({aten.embedding.default, F.embedding})
_BIAS_ADDS = frozenset({aten.add.Tensor, operator.add, torch.add, ("method", "add")})

LAYER_PATTERNS: tuple[LayerPattern, ...] = (
    LayerPattern("linear", "linear", _LINEAR_OPS, _direct(x=0, w=1, b=2)),
    LayerPattern("addmm (HF Conv1D)", "linear", _ADDMM_OPS, _direct(x=1, w=2, b=0, transposed=True)),
    LayerPattern("matmul x·Wᵀ / x·W", "linear", _MATMUL_OPS, _matmul, bias_add=True),
    LayerPattern("einsum", "linear", _EINSUM_OPS, _einsum, bias_add=True),
    *(LayerPattern(kind, kind, ops, _direct(x=0, w=1, b=2)) for kind, ops in _CONV_OPS.items()),
    LayerPattern("embedding", "embedding", frozenset({aten.embedding.default}), _direct(x=1, w=0, b=None)),
    LayerPattern("embedding", "embedding", frozenset({F.embedding}), _direct(x=0, w=1, b=None)),
    LayerPattern("quantized linear", "linear", frozenset(QUANT_LAYER_OPS), _quantized_op),
)
_PATTERN_OF = {op: p for p in LAYER_PATTERNS for op in p.ops}
# the compatibility view of the table for direct ops: op -> (weight index, activation index, bias index)
LAYER_OPS = {
    **{op: (1, 0, 2) for op in _LINEAR_OPS},
    **{op: (2, 1, 0) for op in _ADDMM_OPS},
    **{op: (1, 0, 2) for ops in _CONV_OPS.values() for op in ops},
    aten.embedding.default: (0, 1, None),
    F.embedding: (1, 0, None),
}


@dataclass(frozen=True)
class LayerMatch:
    """One linear-equivalent subgraph: `node`'s value is layer(x) with this weight and bias."""

    node: fx.Node  # the node whose value the layer produces (the bias add, or the op itself)
    op: fx.Node  # the anchor op (a conv's geometry is read off it)
    x: object
    weight: fx.Node  # the node reading the parameter (model layout)
    bias: fx.Node | None
    pattern: LayerPattern
    transposed: bool
    weight_args: tuple | None = None  # a quantized op's operands and constants (see Operands)

    @property
    def kind(self) -> str:
        return self.pattern.kind

    @property
    def slot_weight(self):
        """What the adapter slot takes as W: the weight node, or a quantized op's operand tuple."""
        return self.weight_args if self.weight_args is not None else self.weight


def _bias_add(node: fx.Node, is_param) -> tuple[fx.Node, fx.Node] | None:
    """(add node, bias node) if `node`'s only use is `node + b` with b a 1-D parameter."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op not in ("call_function", "call_method") or _target(user) not in _BIAS_ADDS:
        return None
    if len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not isinstance(other, fx.Node) or not is_param(other):
        return None
    val = other.meta.get("val", other.meta.get("example_value"))
    if val is not None and getattr(val, "dim", lambda: 1)() != 1:
        return None
    return user, other


def match_node(node: fx.Node, is_param) -> LayerMatch | str | None:
    """The layer `node` anchors, or why a pattern op over a parameter is not one (a str), or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    pattern = _PATTERN_OF.get(_target(node))
    if pattern is None:
        return None
    got = pattern.read(node, is_param)
    if not isinstance(got, Operands):
        return got
    out, bias = node, got.bias
    if pattern.bias_add and bias is None:
        extra = _bias_add(node, is_param)
        if extra is not None:
            out, bias = extra
    return LayerMatch(out, node, got.x, got.weight, bias, pattern, got.transposed, got.weight_args)


def refresh(match: LayerMatch) -> LayerMatch:
    """`match` re-read off its op: after earlier rewrites replaced one of its inputs (another layer's
    output feeding this one), the operands are the op's current arguments."""
    got = match_node(match.op, lambda n: n is match.weight or n is match.bias)
    return got if isinstance(got, LayerMatch) else match


def layer_matches(gm: fx.GraphModule, weight_path=None) -> list[LayerMatch]:
    """Every linear-equivalent subgraph of `gm` whose weight is a model tensor, in graph order."""
    weight_path = weight_path or _get_attr_path
    is_param = lambda n: weight_path(n) is not None  # noqa: E731
    found = []
    for node in gm.graph.nodes:
        m = match_node(node, is_param)
        if isinstance(m, LayerMatch):
            found.append(m)
    return found


def layer_operands(node: fx.Node):
    """(activation, weight, bias) argument nodes of a direct layer op in LAYER_OPS (bias may be None); for a
    quantized layer's op, weight is the tuple of its operands and constants."""
    if node.target in QUANT_LAYER_OPS:
        return node.args[0], tuple(node.args[2:]), node.args[1]
    w_idx, x_idx, b_idx = LAYER_OPS[node.target]
    names = {0: "input", 1: "weight", 2: "bias"}
    get = lambda i: None if i is None else _arg(node, i, names.get(i, ""))  # noqa: E731
    return get(x_idx), get(w_idx), get(b_idx)


# -- describing a layer ----------------------------------------------------------------------------
# the geometry arguments after (input, weight, bias): conv(x, W, b, stride, padding, dilation, groups),
# the same positions and names in F.conv*d and aten.conv*d
_CONV_OPTIONS = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(int(e) for e in v) if len(v) == n else (int(v[0]),) * n
    return (int(v),) * n


def layer_from_match(fqn: str, match: LayerMatch, weight: torch.Tensor) -> Layer:
    """The method-facing description of a matched layer, read off the graph itself: `weight` is the
    value its weight node holds (model layout); conv stride/padding/dilation/groups and embedding
    padding_idx/max_norm are the op's own arguments. The graph counterpart of `describe_layer`."""
    common = dict(fqn=fqn, has_bias=match.bias is not None, dtype=weight.dtype)
    kind, op = match.kind, match.op
    if kind == "linear":
        if weight.dim() != 2:
            raise AdapterShapeError(f"{fqn}: a {match.pattern.name} over a {weight.dim()}-D weight is not one layer.")
        shape = (weight.shape[1], weight.shape[0]) if match.transposed else tuple(weight.shape)
        return Layer(kind="linear", weight_shape=shape, transposed=match.transposed, **common)
    if kind in CONV_KINDS:
        n = CONV_KINDS[kind]
        stride, padding, dilation, groups = (_arg(op, i, name, d) for name, i, d in _CONV_OPTIONS)
        return Layer(kind=kind, weight_shape=tuple(weight.shape), stride=_tuple(stride, n),
                     padding=padding if isinstance(padding, str) else _tuple(padding, n),
                     dilation=_tuple(dilation, n), groups=int(groups), **common)
    if op.target is F.embedding:  # F.embedding(input, weight, padding_idx, max_norm, ...)
        return Layer(kind="embedding", weight_shape=tuple(weight.shape),
                     padding_idx=_arg(op, 2, "padding_idx"), max_norm=_arg(op, 3, "max_norm"), **common)
    padding_idx = _arg(op, 2, "padding_idx", -1)  # aten.embedding(weight, indices, padding_idx=-1, ...)
    return Layer(kind="embedding", weight_shape=tuple(weight.shape),
                 padding_idx=None if padding_idx == -1 else padding_idx, **common)


def layer_from_node(fqn: str, node: fx.Node, weight: torch.Tensor, has_bias: bool) -> Layer:
    """`layer_from_match` for a direct layer op (a node whose target is in LAYER_OPS)."""
    x, w, b = layer_operands(node)
    pattern = _PATTERN_OF[node.target]
    match = LayerMatch(node, node, x, w, b if has_bias else None, pattern, node.target in _ADDMM_OPS)
    return layer_from_match(fqn, match, weight)


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind a weight method can adapt, or None. A quantized layer of a kind we do not know
    (GPTQ, AWQ, HQQ, ...) raises an AdapterError naming its class and the supported quantizations."""
    if quantized_kind(module) is not None:  # bitsandbytes / torchao linears (quant/)
        return "linear"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "linear"
    for kind, cls in (("conv1d", nn.Conv1d), ("conv2d", nn.Conv2d), ("conv3d", nn.Conv3d)):
        if isinstance(module, cls):
            return kind
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention):
        return "multihead_attention"
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
    kind = layer_kind(module)
    if isinstance(module, nn.Linear):
        return Layer(kind="linear", weight_shape=tuple(w.shape), **common)
    if kind == "linear":  # HF Conv1D
        return Layer(kind="linear", weight_shape=(w.shape[1], w.shape[0]), transposed=True, **common)
    if kind in CONV_KINDS:
        if module.padding_mode != "zeros":
            raise AdapterShapeError(
                f"{fqn}: {type(module).__name__} with padding_mode={module.padding_mode!r} is not supported; "
                f"exclude it from `targets`.")
        n = CONV_KINDS[kind]
        return Layer(
            kind=kind,
            weight_shape=tuple(w.shape),
            stride=_tuple(module.stride, n),
            padding=module.padding if isinstance(module.padding, str) else _tuple(module.padding, n),
            dilation=_tuple(module.dilation, n),
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


def describe_layers(fqn: str, module: nn.Module, quant=None) -> list[Layer]:
    """The layers one targeted module contributes. nn.MultiheadAttention is two, as in PEFT: its
    packed in_proj (weight `in_proj_weight`, keys on the MHA module) and its out_proj (keys under
    `<mha>.base_layer.out_proj`); MultiheadAttention calls both as F.linear itself, so PEFT merges
    the adapter into them around each call: no input dropout, and out_proj's delta counts twice."""
    if not isinstance(module, nn.MultiheadAttention):
        return [describe_layer(fqn, module, quant)]
    if not module._qkv_same_embed_dim:
        raise AdapterShapeError(
            f"{fqn}: nn.MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v weights; PEFT (and we) "
            f"adapt the packed in_proj_weight only. Exclude it from `targets`.")
    w = module.in_proj_weight
    in_proj = Layer(fqn=fqn, kind="linear", weight_shape=tuple(w.shape), has_bias=module.in_proj_bias is not None,
                    dtype=w.dtype, weight_name="in_proj_weight", bias_name="in_proj_bias", weight_only=True)
    out = module.out_proj
    # PEFT 0.21.2 merges out_proj's delta twice around each call (MultiheadAttention.merge adds it, then
    # calls the wrapped out_proj's merge, which adds it again), and merge_and_unload does the same: its
    # checkpoints mean W_o + 2·s·B·A, which delta_factor keeps
    out_proj = Layer(fqn=f"{fqn}.out_proj", kind="linear", weight_shape=tuple(out.weight.shape),
                     has_bias=out.bias is not None, dtype=out.weight.dtype, peft_path=f"{fqn}.base_layer.out_proj",
                     weight_only=True, delta_factor=2.0)
    return [in_proj, out_proj]


def target_layers(method, spec, model: nn.Module, quant: dict | None = None) -> dict[str, Layer]:
    """Every layer a weight method's spec adapts on `model`, by FQN: its target modules (an
    nn.MultiheadAttention counts two, see `describe_layers`) and the parameters it targets itself
    (`method.parameter_layers`). `quant`: FQN -> QuantInfo of the quantized layers (quant/). Nothing
    is created; `method.check` validates each afterwards."""
    modules = dict(model.named_modules())
    layers: dict[str, Layer] = {}
    fqns = [] if spec.targets == [] else resolve_targets(spec, model, layer_kind)  # []: parameters only
    for fqn in fqns:
        module = modules[fqn]
        if isinstance(module, nn.MultiheadAttention) and "multihead_attention" not in method.kinds:
            raise AdapterShapeError(
                f"{fqn}: {method.name} does not support nn.MultiheadAttention (PEFT adapts it with LoRA only); "
                f"exclude it from `targets`.")
        for layer in describe_layers(fqn, module, (quant or {}).get(fqn)):
            layers[layer.fqn] = layer
    for fqn, layer in method.parameter_layers(spec, model).items():
        if fqn in layers:
            raise AdapterShapeError(f"{fqn}: targeted twice (as a module and as a parameter); pick one.")
        layers[fqn] = layer
    return layers


# -- assigning matches to target layers -------------------------------------------------------------
def node_module_fqn(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return None


def _get_attr_path(node: fx.Node) -> str | None:
    return node.target if node.op == "get_attr" else None


def _owner(fqn: str, module: str | None) -> bool:
    """Whether an op made by `module` may compute target `fqn`: its own op, or one made by an
    ancestor that reads the target's weight itself (MultiheadAttention's out_proj)."""
    return module is None or module == fqn or module == "" or fqn.startswith(module + ".")


def find_layer_matches(
    gm: fx.GraphModule, weights: dict[str, str], weight_path=_get_attr_path, module_fqn=node_module_fqn,
    same_tensor=None,
) -> dict[str, list[LayerMatch]]:
    """For each target layer, the matches that compute it (one per call of the layer).

    `weights`: target FQN -> the FQN of the tensor it reads as its weight (`q_proj.weight`, an MHA's
    `in_proj_weight`). `weight_path(node)`: the FQN a weight node reads, or None if it is not a model
    tensor (captured graphs: get_attr targets; Dynamo graphs: placeholder sources). `module_fqn(node)`:
    the module whose forward made the op, or None (captured graphs: `nn_module_stack`). `same_tensor(a,
    b)`: whether two FQNs name one tensor (tied weights; default: equal names)."""
    same = same_tensor or (lambda a, b: a == b)
    by_module = {}
    for fqn in weights:
        by_module.setdefault(fqn, fqn)
    found: dict[str, list[LayerMatch]] = {}
    for m in layer_matches(gm, weight_path):
        path = weight_path(m.weight)
        if m.weight_args is not None:  # a quantized op's first operand: `<fqn>.weight` or `<fqn>.weight__<operand>`
            path = path.split(OPERAND_SEP)[0]
        owner = module_fqn(m.op)
        hits = [t for t, w in weights.items() if same(path, w) and _owner(t, owner)]
        if not hits:
            continue
        # the op's own module first, then the weight's own name (MHA: in_proj vs out_proj)
        hits.sort(key=lambda t: (t != owner, weights[t] != path))
        found.setdefault(hits[0], []).append(m)
    return found


def find_layer_nodes(gm: fx.GraphModule, fqns: set[str], weight_path=_get_attr_path,
                     module_fqn=node_module_fqn) -> dict[str, list[fx.Node]]:
    """For each target module FQN (its weight `<fqn>.weight`), the nodes whose value is its output."""
    found = find_layer_matches(gm, {f: f"{f}.weight" for f in fqns}, weight_path, module_fqn)
    return {fqn: [m.node for m in ms] for fqn, ms in found.items()}


def find_param_reads(gm: fx.GraphModule, fqn: str) -> list[fx.Node]:
    """get_attr nodes that read a parameter or buffer of module `fqn` (for modules_to_save)."""
    prefix = fqn + "."
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]


def find_tensor_reads(gm: fx.GraphModule, path: str, same_tensor=None) -> list[fx.Node]:
    """get_attr nodes that read the tensor `path` (a targeted nn.Parameter), tied names included."""
    same = same_tensor or (lambda a, b: a == b)
    return [n for n in gm.graph.nodes if n.op == "get_attr" and same(n.target, path)]


def sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The attention cores of the graph, in execution order (used by graph-level methods)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
    ]


# -- what the matcher saw and could not adapt ------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A read of a model weight (≥ 2-D) by some op, and whether / why it is not an adaptable layer."""

    module: str | None  # the module whose forward made the op
    weight: str  # the FQN of the tensor read
    op: str  # the op (or the pattern) that reads it
    reason: str  # "" if it is a linear-equivalent layer


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def survey(gm: fx.GraphModule, weight_value, weight_path=_get_attr_path, module_fqn=node_module_fqn) -> list[Candidate]:
    """Every op of `gm` that reads a model weight of rank ≥ 2: the layers the table recognises
    (reason "") and the others, each with why it is not a layer. `weight_value(path)`: the tensor."""
    is_param = lambda n: weight_path(n) is not None  # noqa: E731
    out, covered = [], set()
    for m in layer_matches(gm, weight_path):
        covered.add(m.op)
        covered.update(a for a in m.op.args if _transposed_param(a, is_param) is not None)
        out.append(Candidate(module_fqn(m.op), weight_path(m.weight), m.pattern.name, ""))
    for node in gm.graph.nodes:
        path = weight_path(node)
        value = weight_value(path) if path is not None else None
        if value is None or value.dim() < 2:
            continue
        for user in node.users:
            if user in covered:
                continue
            op = user
            while _transposed_param(op, is_param) is not None and len(op.users) == 1:
                op = next(iter(op.users))  # W.T feeding something: name what uses it
            why = match_node(op, is_param)
            if not isinstance(why, str):
                why = f"a {value.dim()}-D weight read by {_op_name(op)}, which is not a linear-equivalent layer op"
            if value.dim() > 2 and "target_parameters" not in why:
                why += "; LoRA can adapt the parameter itself with target_parameters"
            out.append(Candidate(module_fqn(user), path, _op_name(op), why))
    return out
