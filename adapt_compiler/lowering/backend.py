"""The torch.compile backend: adapter patterns in Dynamo graphs, lowered before Inductor.

    torch.compile(peft_model, backend="adapt_compiler")           # entry point (pyproject)
    torch.compile(model, backend=ac.backend("adapter_dir", merge=True))

A second front end beside `ac.compile`. Dynamo hands a backend an FX graph of torch-level ops
(`torch._C._nn.linear`, `F.conv2d`, `operator.add`, ...) whose parameters are placeholders; each
placeholder's Dynamo source names its module path. Steps:

    1. fuse_peft_lora        PEFT's LoRA subgraph (PATTERNS below)
                                 add(linear(x, W, b), mul(linear(linear(drop(x), A), B), s))
                             (drop = none, or dropout with training=False or p=0) becomes
                                 adapt_compiler::fused_lora_linear(x, W, b, A, B, s)
                             the same op our own lowering uses: the Triton kernel on CUDA, its
                             reference (then Inductor's C++) on CPU.
    2. apply_spec            only with ac.backend(spec_or_dir): the adapter's target layers, found
                             by `passes.match.find_layer_matches` (the matcher and pattern table
                             ac.compile uses: linear, addmm, x @ W.T, einsum, convs, embeddings)
                             with module paths read off Dynamo's sources, described by
                             `passes.match.layer_from_match`, checkpoint keys and values checked by
                             `checkpoint.check_tensors`; then merge=True replaces each target weight
                             by W' from `merge.fold_layer` (a graph constant; the model is
                             untouched), merge=False routes the layers whose method offers
                             `kernel_operands` through the fused op.
    3. Inductor              compile_fx on the rewritten graph.

Why `SubgraphMatcher` over traced pattern functions, not Inductor's pattern matcher: the patterns
are the Python PEFT runs (`result + lora_B(lora_A(dropout(x))) * scaling`), traced by
`fx.symbolic_trace`, so they read as what they match; Inductor's `register_replacement` traces
patterns to ATen with make_fx, which a torch-level Dynamo graph does not contain, and its
hand-written `CallFunction` trees would restate the pattern as expression trees. Commuted operands
and the dropout-or-not choice are generated variants of one function. The values that differ per
layer (scaling, dropout p / training / inplace, the base bias) are placeholders of the pattern,
bound by the match; `ignore_literals` stays False, because with True a pattern literal would also
stand for a graph node (a lora_B bias, a tensor scaling), so the literals that must hold
(`None` biases on lora_A / lora_B) are matched exactly. Handlers then check what a pattern cannot
say (the scaling is a number, the dropout is the identity) and return None when it does not apply.
Matching runs on a canonical copy of the graph (`F.linear(x, w)` with its bias spelled out, dropout
arguments positional, `torch.add` as `+`), so the user's graph is only changed where a pattern
applies.

All rewrites happen before Inductor sees the graph, so Inductor's FX graph cache keys on the
rewritten graph; no Inductor hook is installed (a hook would be a CustomGraphPass with a uuid()
over its source). Each rewrite bumps a counter in `counters.COUNTERS`.

Errors: what can be checked without the model is checked by `ac.backend(...)` itself (the
checkpoint is read and validated, NaN/Inf included, by `checkpoint.read_adapter` /
`check_tensors`); keys and shapes against the model are checked at the first compile of each
graph, before the graph is changed. Raised inside torch.compile, an AdapterError reaches the user
as Dynamo's `BackendCompilerFailed` carrying it (`.inner_exception`) and its message.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from .. import checkpoint
from ..counters import COUNTERS
from ..errors import AdapterError
from ..names import PEFT_PREFIX
from ..passes import method_for
from ..passes.match import find_layer_matches, layer_from_match, refresh
from ..passes.method import Layer
from ..spec import AdapterSpec, is_target
from .merge import fold_layer


def _fused_op():
    from . import kernels  # noqa: F401 - registers the ops

    return torch.ops.adapt_compiler.fused_lora_linear.default


# -- 1. PEFT's LoRA subgraph, as data --------------------------------------------------------------
def _lora(x, w, bias, a, b, s):
    # y = x Wᵀ + b + s·(x Aᵀ) Bᵀ        (PEFT, lora_dropout=0: lora_dropout is nn.Identity)
    return F.linear(x, w, bias) + F.linear(F.linear(x, a, None), b, None) * s


def _lora_dropout(x, w, bias, a, b, s, p, training, inplace):
    # PEFT, lora_dropout=p in eval: nn.Dropout calls F.dropout(x, p, training=False, inplace)
    return F.linear(x, w, bias) + F.linear(F.linear(F.dropout(x, p, training, inplace), a, None), b, None) * s


def _commuted(graph: fx.Graph, swap_add: bool, swap_mul: bool) -> fx.Graph:
    """The pattern with the operands of its add and/or mul swapped (x + y == y + x in a graph too)."""
    for node in graph.nodes:
        if (node.target is operator.add and swap_add) or (node.target is operator.mul and swap_mul):
            node.args = node.args[::-1]
    return graph


def _patterns() -> list[fx.Graph]:
    out = []
    for fn, swap_add, swap_mul in itertools.product((_lora, _lora_dropout), (False, True), (False, True)):
        graph = fx.symbolic_trace(fn).graph
        _canonicalize(graph)
        out.append(_commuted(graph, swap_add, swap_mul))
    return out


# spellings Dynamo may record for one op -> the one patterns use
_SAME_OP = {torch.add: operator.add, torch.mul: operator.mul, torch.dropout: F.dropout}
_DROPOUT_SIGNATURE = inspect.signature(F.dropout)  # (input, p=0.5, training=True, inplace=False)


def _canonicalize(graph: fx.Graph) -> None:
    """Respell the graph's linear / dropout / add / mul calls as the patterns spell them."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.add, torch.mul) and (len(node.args) != 2 or node.kwargs):
            continue  # torch.add(x, y, alpha=...) is not x + y
        if node.target is torch.dropout:  # torch.dropout(input, p, train)
            node.args, node.kwargs = tuple(node.args) + (False,), dict(node.kwargs)
        node.target = _SAME_OP.get(node.target, node.target)
        if node.target is torch._C._nn.linear:  # F.linear(input, weight, bias=None)
            names = ("input", "weight", "bias")
            args = list(node.args) + [node.kwargs.get(k) for k in names[len(node.args):]]
            node.args, node.kwargs = tuple(args), {}
        elif node.target is F.dropout:
            try:
                bound = _DROPOUT_SIGNATURE.bind(*node.args, **node.kwargs)
            except TypeError:
                continue
            bound.apply_defaults()
            node.args, node.kwargs = tuple(bound.arguments.values()), {}


def _canonical_copy(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A canonical copy of `graph` to match on, and the map from its nodes back to `graph`'s."""
    view, env = fx.Graph(), {}
    view.output(view.graph_copy(graph, env))
    _canonicalize(view)
    return view, {new: old for old, new in env.items()}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _lora_operands(bound: dict):
    """(x, W, b, A, B, s) of a match (placeholder name -> graph value) if it is PEFT's LoRA; else None."""
    if not _is_number(bound["s"]):
        return None  # a tensor scaling is not the fused op's float `s`
    if "training" in bound and not (bound["training"] is False or (_is_number(bound["p"]) and bound["p"] == 0)):
        return None  # dropout in training mode changes the LoRA input
    return bound["x"], bound["w"], bound["bias"], bound["a"], bound["b"], float(bound["s"])


def fuse_peft_lora(gm: fx.GraphModule) -> int:
    """Rewrite each PEFT LoRA subgraph to the fused op. Returns the number rewritten.

    Expects a torch-level FX graph (what Dynamo hands a backend). Leaves the graph as it was
    where no pattern applies; where one does, the pattern's nodes are replaced by one call of
    adapt_compiler::fused_lora_linear (its meta copied from the add it replaces)."""
    view, back = _canonical_copy(gm.graph)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}.__getitem__
    op, count, done = None, 0, set()
    for pattern in PATTERNS:
        for match in SubgraphMatcher(pattern, ignore_literals=False).match(view):
            (out,) = match.returning_nodes
            out = back[out]
            if out in done:
                continue
            bound = {pn.target: match.nodes_map[pn] for pn in pattern.nodes if pn.op == "placeholder"}
            operands = _lora_operands({k: back[v] if isinstance(v, fx.Node) else v for k, v in bound.items()})
            if operands is None:
                continue
            op = op or _fused_op()
            inner = [back[gn] for pn, gn in match.nodes_map.items() if pn.op not in ("placeholder", "output")]
            with gm.graph.inserting_before(out):
                new = gm.graph.call_function(op, operands)
            new.meta.update(out.meta)
            out.replace_all_uses_with(new)
            for node in sorted(inner, key=position, reverse=True):  # users before producers
                if not node.users:
                    gm.graph.erase_node(node)
            done.add(out)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    COUNTERS["backend_peft_lora_fused"] += count
    return count


PATTERNS = _patterns()


# -- 2. an adapter applied by module path ----------------------------------------------------------
# the frame's local or global that holds the model: L['self'], or L['args'][0] when torch.compile wraps
# the module's call
_ROOT = re.compile(r"^[LG]\['[^']*'\](\[\d+\])?")
_SEGMENT = re.compile(r"\['([^']*)'\]|\.(\w+)|\[(\d+)\]")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}


def _dynamo_path(name: str) -> str | None:
    """'model.layers.0.q_proj' from a Dynamo source expression such as
    "L['args'][0]._modules['model'].layers[0].__dict__['_modules']['q_proj']", else None."""
    root = _ROOT.match(name)
    if root is None:
        return None
    parts = [next(g for g in m.groups() if g is not None) for m in _SEGMENT.finditer(name, root.end())]
    return ".".join(p for p in parts if p not in _CONTAINERS) or None


def _module_path(node: fx.Node) -> str | None:
    """'model.layers.0.q_proj.weight' from a placeholder's Dynamo source, else None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    return _dynamo_path(source.name() if callable(source.name) else source.name)  # a method in older torch


def _stack_module_path(node: fx.Node) -> str | None:
    """The module whose forward made `node`, from Dynamo's nn_module_stack, else None."""
    stack = node.meta.get("nn_module_stack")
    return _dynamo_path(list(stack.values())[-1][0]) if stack else None


class AdapterBackend:
    """`torch.compile(model, backend=ac.backend(spec_or_dir, merge=...))`."""

    name = "default"  # the adapter's name in messages (ac.compile names a single adapter so too)

    def __init__(self, spec_or_dir=None, merge: bool = False):
        self.merge = merge
        self.spec, self.tensors, self.where = None, {}, None
        if isinstance(spec_or_dir, (str, Path)):
            self.spec, tensors, _ = checkpoint.read_adapter(spec_or_dir)  # CheckpointError if unreadable
            self.where = str(spec_or_dir)
        elif isinstance(spec_or_dir, AdapterSpec):
            self.spec = spec_or_dir
        elif spec_or_dir is not None:
            raise AdapterError(
                f"ac.backend(): expected an adapter spec or a PEFT adapter directory, got {type(spec_or_dir).__name__}."
            )
        elif merge:
            raise AdapterError("ac.backend(merge=True) needs the adapter: ac.backend(spec_or_dir, merge=True).")
        if self.spec is None:
            return
        method = self.method = method_for(self.spec)
        what = f"ac.backend({self.where or type(self.spec).__name__})"
        if getattr(method, "kind", "weight") == "graph":
            raise AdapterError(f"{what}: {method.name} is a graph-level method; use ac.compile(model, spec).")
        if self.spec.targets is None:
            raise AdapterError(f"{what}: the spec needs explicit targets=[...] (no model type to default from).")
        if self.spec.targets == "all-linear":
            raise AdapterError(
                f"{what}: targets='all-linear' needs the model (to leave out its output head); list the module "
                f"names in targets=[...], or use ac.compile(model, spec)."
            )
        if self.spec.modules_to_save:
            raise AdapterError(f"{what}: modules_to_save is not served by the torch.compile backend; use "
                               f"ac.compile(model, spec).")
        if merge and method.merge_kind == "none":
            raise AdapterError(f"{what}: {method.name} adapters cannot be merged into the weights; use merge=False "
                               f"or ac.compile(model, spec).")
        if self.where is not None:
            # the same key normalisation and NaN/Inf refusal as ac.compile(model, dir); keys and shapes
            # are checked against each compiled graph (the model is not known before)
            self.tensors = {method.checkpoint_key(k): v for k, v in tensors.items()
                            if not checkpoint.is_saved_base_layer(k)}
            checkpoint.check_tensors(self.tensors, self.tensors, self.where, self._what)
        self._params: dict[str, dict] = {}  # fqn -> adapter tensors (created once, reused on recompiles)
        self._shared: dict[str, torch.Tensor] | None = None  # method.init_shared, once

    @property
    def _what(self) -> str:
        return f"adapter {self.name!r}"

    def __call__(self, gm: fx.GraphModule, example_inputs):
        fuse_peft_lora(gm)
        if self.spec is not None:
            self.apply_spec(gm, example_inputs)
        return _inductor(gm, example_inputs)

    # -- finding the target layers --------------------------------------------------------------
    def _target_layers(self, gm: fx.GraphModule, values: dict, paths: dict) -> dict[str, tuple[Layer, list]]:
        """fqn -> (Layer, its layer-op nodes) for every target layer of this graph."""
        modules = {p.rsplit(".", 1)[0] for p in paths.values() if "." in p}
        modules |= {m for n in gm.graph.nodes if n.op == "call_function" and (m := _stack_module_path(n))}
        fqns = {m for m in modules if is_target(self.spec, m, self.spec.targets)}
        known = {p: id(values[n]) for n, p in paths.items()}  # tied weights: one placeholder, one tensor

        def same_tensor(a, b):
            return a == b or (a in known and b in known and known[a] == known[b])

        # matched by the op's own module: a tied weight read by another module is not this layer
        found = find_layer_matches(gm, {f: f"{f}.weight" for f in fqns}, weight_path=paths.get,
                                   module_fqn=_stack_module_path, same_tensor=same_tensor)
        layers = {}
        for fqn, own in found.items():
            layer = layer_from_match(fqn, own[0], values[own[0].weight])
            for match in own[1:]:
                other = layer_from_match(fqn, match, values[match.weight])
                if other != layer:
                    raise AdapterError(
                        f"{fqn}: called as different layers in one graph ({layer.kind} and {other.kind}, or with other "
                        f"geometry); exclude it from targets or use ac.compile(model, spec)."
                    )
            layers[fqn] = (layer, own)
        return layers

    # -- the adapter's tensors ------------------------------------------------------------------
    def _adapter_params(self, layers: dict, values: dict, modules: set[str]) -> dict[str, dict]:
        """fqn -> the adapter's tensors on that layer (shared ones included), created on first use;
        from a checkpoint, its tensors for this graph's modules are validated first (CheckpointError)."""
        method, spec = self.method, self.spec
        weights = {fqn: values[matches[0].weight] for fqn, (_, matches) in layers.items()}
        device = next(iter(weights.values())).device
        shared = self._shared
        if shared is None:
            created = method.init_shared(spec, [layer for layer, _ in layers.values()])
            shared = {k: v.to(device) for k, v in created.items()}
        params = dict(self._params)
        for fqn, (layer, _) in layers.items():
            if fqn not in params:
                w = weights[fqn]
                p = method.init_params(spec, layer, w.t() if layer.transposed else w)
                params[fqn] = {k: v.to(w.device) for k, v in p.items()}
        if self.where is not None:
            expected = {method.shared_peft_key(k): t for k, t in shared.items() if method.shared_peft_key(k)}
            for fqn, (layer, _) in layers.items():
                for pname, t in params[fqn].items():
                    key = method.peft_key(pname, layer)
                    if key is not None:
                        expected[f"{PEFT_PREFIX}{fqn}.{key}"] = t
            # keys of modules this graph does not contain belong to another graph (a graph break)
            given = {k: v for k, v in self.tensors.items() if k in expected or _key_module(k, modules)}
            checkpoint.check_tensors(expected, given, self.where, self._what)
            checkpoint.copy_tensors(expected, given)
        self._shared = shared
        self._params = params
        return {fqn: {**shared, **params[fqn]} for fqn in layers}

    # -- the rewrite ----------------------------------------------------------------------------
    def apply_spec(self, gm: fx.GraphModule, example_inputs) -> int:
        """Adapt this graph's target layers (merged weights or the fused op). Returns how many."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = {n: v for n, v in zip(placeholders, example_inputs) if isinstance(v, torch.Tensor)}
        paths = {n: p for n in values if (p := _module_path(n)) is not None}
        layers = self._target_layers(gm, values, paths)
        if not layers:
            if self.where is not None:
                raise AdapterError(f"ac.backend({self.where}): no layer of the compiled graph matched the adapter's "
                                   f"targets {self.spec.targets!r}; use the checkpoint made for this model.")
            return 0
        for layer, _ in layers.values():  # validate everything before changing anything
            self.method.check(self.spec, layer)
        modules = {p.rsplit(".", 1)[0] for p in paths.values() if "." in p} | set(layers)
        params = self._adapter_params(layers, values, modules)
        if self.merge:
            plans = {fqn: self._merged(layer, nodes, params[fqn], values)
                     for fqn, (layer, nodes) in layers.items()}
            for fqn, (layer, nodes) in layers.items():
                self._use_merged(gm, layer, nodes, *plans[fqn])
        else:
            plans = {fqn: self._kernel_operands(layer, params[fqn]) for fqn, (layer, _) in layers.items()}
            for fqn, (layer, nodes) in layers.items():
                self._use_fused(gm, layer, nodes, plans[fqn])
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        COUNTERS["backend_layers_adapted"] += len(layers)
        return len(layers)

    def _merged(self, layer: Layer, nodes, p, values):
        """(W', b' or None) in the model's layout, folded like AdaptedModule.merge (float32 for halves)."""
        w_node, b_node = nodes[0].weight, nodes[0].bias
        if isinstance(b_node, fx.Node) and b_node not in values:
            raise AdapterError(f"{layer.fqn}: its bias is computed in the graph, not a parameter; merge=True cannot "
                               f"fold into it. Use ac.compile(model, spec).")
        b = values[b_node] if isinstance(b_node, fx.Node) else None
        return fold_layer(layer, [(self.method, self.spec, p)], values[w_node], b)

    def _use_merged(self, gm, layer: Layer, nodes, new_w, new_b) -> None:
        w_node, b_node = nodes[0].weight, nodes[0].bias
        w_const = _constant(gm, w_node, layer.fqn + ".weight", new_w, like=True)
        b_const = None
        if new_b is not None:
            b_const = _constant(gm, b_node, layer.fqn + ".bias", new_b.contiguous(), like=True)
        for match in nodes:  # the layer's own ops; the placeholder stays for any other reader
            for node in {match.op, match.node, *[a for a in match.op.args if isinstance(a, fx.Node)]}:
                if w_node in node.all_input_nodes and node.op != "placeholder":
                    node.replace_input_with(w_node, w_const)
                if b_const is not None and b_node in node.all_input_nodes:
                    node.replace_input_with(b_node, b_const)

    def _kernel_operands(self, layer: Layer, p):
        operands = None if layer.transposed else self.method.kernel_operands(self.spec, layer, p, False)
        if operands is None:
            raise AdapterError(
                f"{layer.fqn}: ac.backend(..., merge=False) serves LoRA on Linear layers; for {self.method.name} on a "
                f"{layer.kind} use merge=True or ac.compile(model, spec)."
            )
        return operands

    def _use_fused(self, gm, layer: Layer, nodes, operands) -> None:
        op = _fused_op()
        a_t, b_t, s = operands
        w_node = nodes[0].weight
        a = _constant(gm, w_node, layer.fqn + ".lora_A", a_t.detach())
        b = _constant(gm, w_node, layer.fqn + ".lora_B", b_t.detach())
        for match in nodes:
            match = refresh(match)  # an earlier layer's rewrite may have rewired its input
            with gm.graph.inserting_before(match.node):
                new = gm.graph.call_function(op, (match.x, match.weight, match.bias, a, b, s))
            new.meta.update(match.node.meta)
            match.node.replace_all_uses_with(new)
            for node in dict.fromkeys([match.node, match.op]):  # the op and its bias add; views go with DCE
                if not node.users and not node._erased:
                    gm.graph.erase_node(node)


def _key_module(key: str, modules: set[str]) -> bool:
    """Whether a PEFT key (`base_model.model.<module>.<param>`) belongs to one of `modules`."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _constant(gm: fx.GraphModule, node: fx.Node, name: str, value: torch.Tensor, like=False) -> fx.Node:
    """A graph constant (get_attr of a new buffer on gm) inserted after `node`."""
    attr = "_ac_" + re.sub(r"\W", "_", name)
    gm.register_buffer(attr, value, persistent=False)
    if hasattr(gm, "_param_name_to_source"):  # AOT autograd dedups Dynamo graph params by source
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source[attr] = ConstantSource(attr)
    with gm.graph.inserting_after(node):
        const = gm.graph.get_attr(attr)
    if like:  # same shape and dtype as `node`: its example value describes the constant too
        const.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")})
    return const


def _inductor(gm: fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def adapt_compiler_backend(gm: fx.GraphModule, example_inputs):
    """`torch.compile(model, backend="adapt_compiler")`: PEFT LoRA -> the fused op, then Inductor."""
    fuse_peft_lora(gm)
    return _inductor(gm, example_inputs)


def make_backend(spec_or_dir=None, merge: bool = False):
    """`ac.backend(spec_or_dir, merge=...)`: a torch.compile backend serving that adapter."""
    if spec_or_dir is None and not merge:
        return adapt_compiler_backend
    return AdapterBackend(spec_or_dir, merge=merge)
