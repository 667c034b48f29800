"""Attention projections found in a captured graph: the structural default targets.

A helper file (the method registry skips `_`-prefixed files). For a model type that no PEFT table
lists, the default targets are what those tables spell out by hand for the listed ones: the layers
that compute each attention's queries and values (or the fused qkv projection). Every attention
core is found by what it computes, not by module names:

* `scaled_dot_product_attention(q, k, v)`;
* an eager attention: a softmax over scores that come from a matmul of two operands (q, kᵀ; through
  scale, mask and bias adds), whose probabilities feed another matmul with v.

From each of q, k, v the graph is walked back (through reshapes, transposes, RoPE, norms, casts)
to the first linear-equivalent layer (passes/match.py's LAYER_PATTERNS) on every path.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .match import layer_matches, node_module_fqn

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, torch.nn.functional.softmax}
_SCORES = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.mm.default, torch.matmul,
           torch.bmm, torch.baddbmm, operator.matmul}
_SDPA = {aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention}


def attention_cores(gm: fx.GraphModule) -> list[tuple]:
    """(q, k, v) operand nodes of every attention core, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA and len(node.args) >= 3:
            out.append(tuple(node.args[:3]))
        elif node.target in _SOFTMAX:
            qk = _upstream_matmul(node.args[0])
            pv = _downstream_matmul(node)
            if qk is not None and pv is not None:
                q, k = _operands(qk)
                v = next((a for a in _operands(pv) if a is not None and not _reaches(a, node)), None)
                if q is not None and k is not None and v is not None:
                    out.append((q, k, v))
    return out


def _operands(mm: fx.Node) -> tuple:
    args = [a for a in mm.args if isinstance(a, fx.Node)]
    if mm.target in (aten.baddbmm.default, torch.baddbmm):  # baddbmm(bias, q, kᵀ): bias is the alibi term
        args = args[1:]
    return (args + [None, None])[:2]


def _upstream_matmul(node, depth: int = 8):
    """The scores' matmul: first matmul above `node` through elementwise adds/scales/casts/masks."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in _SCORES:
            return node
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not tensors:
            return None
        node = max(tensors, key=lambda a: _numel(a))  # the scores, not the mask or bias broadcast into them
    return None


_CHECKS = {aten._assert_tensor_metadata.default}  # export's metadata asserts read a tensor, compute nothing


def _downstream_matmul(node, depth: int = 6):
    for _ in range(depth):
        users = [u for u in node.users if u.op == "call_function" and u.target not in _CHECKS]
        hit = next((u for u in users if u.target in _SCORES), None)
        if hit is not None:
            return hit
        if len(users) != 1:
            return None
        node = users[0]
    return None


def _reaches(node: fx.Node, target: fx.Node, depth: int = 8) -> bool:
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n is target:
                return True
            if n in seen:
                continue
            seen.add(n)
            nxt += [a for a in n.all_input_nodes]
        frontier = nxt
    return False


def _numel(node: fx.Node) -> int:
    val = node.meta.get("val", node.meta.get("example_value"))
    shape = getattr(val, "shape", ())
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 128
    return n


def _layers_above(node, outputs: dict, limit: int = 400) -> set[str]:
    """Modules of the first layers above `node` on every path (`outputs`: layer output node -> module)."""
    found, seen, stack = set(), set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in outputs:
            found.add(outputs[n])
            continue
        if n.op in ("placeholder", "get_attr") or n.target in _SOFTMAX or n.target in _SDPA:
            continue
        stack += n.all_input_nodes
    return found


def attention_projections(gm: fx.GraphModule, weight_path=None, module_fqn=node_module_fqn) -> list[dict]:
    """Per attention core: {"q": modules, "k": modules, "v": modules} of the layers that compute them."""
    outputs = {}
    for m in layer_matches(gm, weight_path):
        fqn = module_fqn(m.op)
        if fqn:
            outputs[m.node] = fqn
    return [{"q": _layers_above(q, outputs), "k": _layers_above(k, outputs), "v": _layers_above(v, outputs)}
            for q, k, v in attention_cores(gm)]


def query_value_layers(gm: fx.GraphModule, weight_path=None, module_fqn=node_module_fqn) -> list[str]:
    """The modules computing every attention's queries and values (PEFT's default convention), in
    graph order; a fused qkv projection counts once."""
    out: dict[str, None] = {}
    for proj in attention_projections(gm, weight_path, module_fqn):
        for fqn in sorted(proj["q"]) + sorted(proj["v"]):
            out.setdefault(fqn)
    return list(out)
