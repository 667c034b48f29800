"""Graphs compiled over flat inputs and outputs, for calls that carry stateful containers (a KV cache).

A captured graph takes and returns pytrees; a transformers Cache is one. torch.compile of the graph
as captured also compiles its pytree code: Dynamo then guards on the cache object's Python
attributes and, after every call, rebuilds a new cache object from the outputs. In a decode loop
that runs once per token this is most of the Python time. `FlatStep` compiles a copy of the graph
whose inputs and outputs are the flat leaves, and handles the pytrees itself:

* inputs are flattened with the capture's in_spec (the same check the captured graph makes);
* an output that is an input updated in place (a static cache's KV tensors after `index_copy_`, its
  `cumulative_length` after `add_`) is not returned by the compiled graph: it is the input tensor;
* an output container whose leaves are exactly the leaves of one input container of the same type
  (the static cache, updated in place) is that input object, not a rebuilt copy, so the caller keeps
  one cache object for the whole generation.

Nothing here knows about transformers: the rules are about aliasing and pytree structure.
"""

from __future__ import annotations

import copy
import inspect

from torch import fx
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

_BUILTIN = (list, tuple, dict, type(None))


def _aliased_input(node, placeholders: dict) -> int | None:
    """The flat input index `node` is (an input, or an in-place op's result on one), else None."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        if node.op == "placeholder":
            return placeholders.get(node)
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        alias = schema.arguments[0].alias_info if schema is not None and schema.arguments else None
        returns = schema.returns[0].alias_info if schema is not None and schema.returns else None
        if alias is None or not alias.is_write or returns is None or not node.args:
            return None  # not an in-place op that returns its first argument
        node, seen = node.args[0], seen + 1
    return None


def _input_objects(spec, start: int = 0, path=()):
    """(path, first leaf, leaf count, spec) of every non-builtin container in an input spec."""
    found, count = [], 0
    if spec.is_leaf():
        return found, 1
    children = spec.children()
    keys = spec.context if spec.type is dict else range(len(children))
    for key, child in zip(keys, children):
        sub, n = _input_objects(child, start + count, (*path, key))
        found += sub
        count += n
    if spec.type not in _BUILTIN and path:
        found.append((path, start, count, spec))
    return found, count


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


class FlatStep:
    """`gm` (a captured, built graph with pytree codegen) called through a flat copy (see the module doc)."""

    def __init__(self, gm: fx.GraphModule):
        info = gm.graph._codegen.pytree_info
        self.in_spec, self.out_spec = info.in_spec, info.out_spec
        self.signature = inspect.signature(gm.forward)
        graph = copy.deepcopy(gm.graph)
        graph._codegen = fx.graph.CodeGen()
        placeholders = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
        output = next(n for n in graph.nodes if n.op == "output")
        leaves = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        self.plan, kept = [], []  # per output leaf: ("out", j) computed, ("in", i) the input leaf i
        for leaf in leaves:
            i = _aliased_input(leaf, placeholders)
            if i is None:
                self.plan.append(("out", len(kept)))
                kept.append(leaf)
            else:
                self.plan.append(("in", i))
        output.args = (tuple(kept),)
        graph.lint()
        self.gm = fx.GraphModule(gm, graph)
        self.gm.meta = gm.meta  # the guard's verdict is read from the built graph's meta (report())
        self.gm.meta["ac_flat"] = True  # compiled over its tensors where it can be (lowering/lifted.py)
        objects, _ = _input_objects(self.in_spec)
        self.objects = {(start, count): (path, spec) for path, start, count, spec in objects}
        self.builder = self._plan(self.out_spec, [0])
        self.fn = self.gm  # replaced by the lowered (compiled, guarded) callable

    def _plan(self, spec, pos: list):
        """How to build the output: ("leaf", kind, i) | ("input", path) | ("node", type, context, children)."""
        if spec.is_leaf():
            kind, i = self.plan[pos[0]]
            pos[0] += 1
            return ("leaf", kind, i)
        n = spec.num_leaves
        mine = self.plan[pos[0]:pos[0] + n]
        if spec.type not in _BUILTIN and n and all(k == "in" for k, _ in mine):
            start = mine[0][1]
            path, in_spec = self.objects.get((start, n), (None, None))
            # the same leaves in the same order and the same Python state (the spec's context: e.g. a
            # cache whose `is_updated` flags the call flipped is rebuilt, not reused)
            if in_spec == spec and [i for _, i in mine] == list(range(start, start + n)):
                pos[0] += n
                return ("input", path)
        return ("node", spec.type, spec.context, [self._plan(child, pos) for child in spec.children()])

    def flatten(self, args, kwargs) -> list:
        """The call's flat leaves, in the order the compiled graph takes them."""
        return fx_pytree.tree_flatten_spec(((), dict(self.signature.bind(*args, **kwargs).arguments)), self.in_spec)

    def __call__(self, *args, **kwargs):
        named = dict(self.signature.bind(*args, **kwargs).arguments)
        leaves = fx_pytree.tree_flatten_spec(((), named), self.in_spec)
        outs = self.fn(*leaves)
        return self._build(self.builder, outs, leaves, ((), named))

    def _build(self, plan, outs, leaves, inputs):
        if plan[0] == "leaf":
            return outs[plan[2]] if plan[1] == "out" else leaves[plan[2]]
        if plan[0] == "input":
            return _lookup(inputs, plan[1])
        _, typ, context, children = plan
        values = [self._build(child, outs, leaves, inputs) for child in children]
        return pytree.SUPPORTED_NODES[typ].unflatten_fn(values, context)
