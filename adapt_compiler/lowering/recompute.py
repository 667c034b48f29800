"""Activation checkpointing inside the adapted graph: repeated blocks recompute in the backward.

torch.export inlines HF's gradient checkpointing (`torch.utils.checkpoint` runs its function while
tracing), so a captured training graph saves every block's activations whatever the model's flag
says. This pass puts checkpointing back, in our graph, where it can be seen:

    ac_recompute_model__layers__0 = <the nodes of model.layers.0, adapters included, as a GraphModule>
    checkpoint = torch.utils.checkpoint.checkpoint(ac_recompute_model__layers__0, hidden, cos, sin, mask,
                                                   use_reentrant=False)
    add_9 = getitem(checkpoint, 0)

A block input that is large but cheap to rebuild from small tensors (the 4-D attention mask every
decoder layer takes, RoPE's cos/sin) is rebuilt inside each checkpointed block instead of being
kept for its recompute (`_replayed_inputs`); only the small tensors it is built from are kept.

Blocks are found from the nodes' `nn_module_stack` (export records which module each node came
from): a block is a child of a ModuleList/Sequential with at least two children (a decoder
layer), and its nodes must run contiguously with no in-place mutation (a recompute would mutate
twice). Eager runs `torch.utils.checkpoint` as is (non-reentrant, RNG state preserved, so
dropout masks repeat); under torch.compile, Dynamo turns it into the `tag_activation_checkpoint`
higher-order op and AOTAutograd's partitioner recomputes the block in the backward (with the
joint graph's CSE off, which would merge identical nodes of different blocks and keep the merged
node: lowering/__init__.py `_with_memory_budget`).

Which blocks (the table's `Recompute`, table.py): "model" follows the layers' own
`gradient_checkpointing` flags in the user's model, "on" takes every `every_n_layers`-th block,
"off" none; with a `memory_budget` under a lowering that cannot take one (`by_blocks`), a
(1 - budget) share of the blocks is checkpointed as well. Runs on training graphs only, after
planning (pipeline step 8), so the adapters' nodes are recomputed with their block.
"""

from __future__ import annotations

import operator
import re
import warnings

import torch
from torch import fx, nn

from ..names import slot_key

RECOMPUTE_PREFIX = "ac_recompute_"
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _path(raw: str) -> str:
    """An nn_module_stack path as an FQN ("L['self'].layers[0]" in strict traces, "layers.0" here)."""
    raw = raw.replace("L['self'].", "").replace("L['self']", "")
    return re.sub(r"\[(\d+)\]", r".\1", raw).strip(".")


class _Blocks:
    """Which nn_module_stack paths are repeated blocks of `model` (cached per path)."""

    def __init__(self, model: nn.Module):
        self.model, self.cache = model, {}

    def is_block(self, path: str) -> bool:
        if path not in self.cache:
            m = _INDEXED.match(path)
            ok = False
            if m:
                try:
                    parent = self.model.get_submodule(m.group(1))
                except AttributeError:
                    parent = None
                ok = isinstance(parent, (nn.ModuleList, nn.Sequential)) and len(parent) >= 2
            self.cache[path] = ok
        return self.cache[path]

    def of(self, node: fx.Node) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        for raw, _ in stack.values():  # outermost first: the decoder layer, not a ModuleList inside it
            path = _path(raw)
            if path and self.is_block(path):
                return path
        return None


def find_blocks(gm: fx.GraphModule, model: nn.Module) -> dict[str, list[fx.Node]]:
    """Block FQN -> its nodes in graph order. Nodes without module metadata (e.g. inserted later)
    belong to a block when the nodes before and after them do."""
    blocks = _Blocks(model)
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]
    owner = [blocks.of(n) for n in nodes]
    for i, o in enumerate(owner):
        if o is None:
            before = next((owner[j] for j in range(i - 1, -1, -1) if owner[j] is not None), None)
            after = next((owner[j] for j in range(i + 1, len(owner)) if owner[j] is not None), None)
            if before is not None and before == after:
                owner[i] = before
    out: dict[str, list[fx.Node]] = {}
    for n, o in zip(nodes, owner):
        if o is not None:
            out.setdefault(o, []).append(n)
    return out


def chosen_blocks(paths: list[str], model: nn.Module, recompute) -> list[str]:
    """The blocks to checkpoint under the table's Recompute settings (see the module docstring)."""
    chosen = set()
    if recompute.mode == "on":
        chosen = {p for i, p in enumerate(paths) if i % recompute.every_n_layers == 0}
    elif recompute.mode == "model":
        chosen = {p for p in paths if _model_checkpoints(model, p)}
    if recompute.memory_budget is not None and recompute.by_blocks and paths:
        k = round((1.0 - recompute.memory_budget) * len(paths))  # blocks that drop their activations
        chosen |= {p for i, p in enumerate(paths) if (i + 1) * k // len(paths) > i * k // len(paths)}
    return [p for p in paths if p in chosen]


def _model_checkpoints(model: nn.Module, path: str) -> bool:
    """Does the user's model checkpoint this block (HF: the layer's `gradient_checkpointing` flag,
    or, in older models, the flag on a module above the layer list)?"""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            flag = getattr(model.get_submodule(".".join(parts[:i])), "gradient_checkpointing", None)
        except AttributeError:
            flag = None
        if isinstance(flag, bool):
            return flag
    return bool(getattr(model, "gradient_checkpointing", False) is True)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _contiguous(gm: fx.GraphModule, region: list[fx.Node]) -> bool:
    inside = set(region)
    started = False
    for n in gm.graph.nodes:
        if n is region[0]:
            started = True
        if started and n.op not in ("get_attr", "placeholder") and n not in inside:
            return False
        if n is region[-1]:
            return True
    return False


def checkpoint_blocks(gm: fx.GraphModule, model: nn.Module, recompute) -> list[str]:
    """Outline each chosen block into a GraphModule called through torch.utils.checkpoint (see the
    module docstring). Returns the checkpointed blocks; warns, naming the model class, when
    checkpointing was asked for and no block could be checkpointed."""
    if recompute.mode == "off" and recompute.memory_budget is None:
        return []
    blocks = find_blocks(gm, model)
    wanted = chosen_blocks(list(blocks), model, recompute)
    asked = (recompute.mode == "on" or (recompute.mode == "model" and model_checkpoints(model))
             or (recompute.by_blocks and recompute.memory_budget is not None and recompute.memory_budget < 1))
    done, refused, replayed = [], [], set()
    for path in wanted:
        region = blocks[path]
        if any(_mutates(n) for n in region) or not _contiguous(gm, region):
            refused.append(path)
            continue
        replayed.update(_outline(gm, path, region, recompute.options))
        done.append(path)
    for n in reversed(gm.graph.nodes):  # what every block now rebuilds itself
        if n in replayed and not n.users:
            gm.graph.erase_node(n)
    if refused or (asked and not done):
        why = (f"blocks {refused[:3]} mutate tensors in place or do not run contiguously" if refused
               else "its graph has no repeated blocks (children of a ModuleList/Sequential)")
        warnings.warn(
            f"adapt_compiler: gradient checkpointing cannot be honoured for {type(model).__name__}: {why}; "
            f"{'those blocks train' if done else 'it trains'} without recomputation (more activation memory).",
            UserWarning, stacklevel=3,
        )
    return done


def model_checkpoints(model: nn.Module) -> bool:
    """Has the user's model gradient checkpointing on (any module's `gradient_checkpointing` flag)?"""
    return any(getattr(m, "gradient_checkpointing", None) is True for m in model.modules())


def _outline(gm: fx.GraphModule, path: str, region: list[fx.Node], options: dict) -> list[fx.Node]:
    """Returns the nodes outside the block that the block now replays (see _replayed_inputs)."""
    replayed = _replayed_inputs(region)
    body = replayed + region
    inside, own = set(body), set(region)
    inputs: list[fx.Node] = []
    for n in body:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in region if any(u not in own for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for a, p in env.items():
        p.meta = dict(a.meta)
    for n in body:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    name = RECOMPUTE_PREFIX + slot_key(path)
    gm.add_submodule(name, fx.GraphModule(gm, sub))
    graph = gm.graph
    with graph.inserting_before(region[0]):
        fn = graph.get_attr(name)
        call = graph.call_function(torch.utils.checkpoint.checkpoint, (fn, *inputs), {**options, "use_reentrant": False})
        call.meta["ac_recompute"] = path
        call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        for i, o in enumerate(outputs):
            got = graph.call_function(operator.getitem, (call, i))
            got.meta = dict(o.meta)
            o.replace_all_uses_with(got, delete_user_cb=lambda u: u not in own)
    for n in reversed(region):
        graph.erase_node(n)
    return replayed


# An input a block would keep for its recompute is instead recomputed inside the block when it
# is a pure function of tensors at most 1/_REPLAY_RATIO of its size, through at most
# _REPLAY_NODES nodes. The case that matters is the 4-D attention mask ([batch, 1, seq, seq] bool,
# built from the [batch, seq] padding mask before the layers and passed to every layer): as a block
# input it is kept for the backward next to the blocks' hidden states (2 MiB at batch 8 x 512);
# rebuilt, only the padding mask is kept. (Under Inductor the larger cost was the float mask each
# layer makes from it, merged across layers by AOTAutograd's CSE: lowering/__init__.py.)
_REPLAY_RATIO = 4
_REPLAY_NODES = 64


def _replayed_inputs(region: list[fx.Node]) -> list[fx.Node]:
    """The nodes outside `region` that produce its large, cheaply recomputable inputs, in graph order."""
    inside = set(region)
    replay: set[fx.Node] = set()
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in replay:
                replay |= _producers(a)
    return [n for n in region[0].graph.nodes if n in replay]


def _producers(a: fx.Node) -> set[fx.Node]:
    """The nodes to replay so that `a` is rebuilt from tensors at most 1/_REPLAY_RATIO its size
    (empty when there are none: `a` stays a block input)."""
    size = _nbytes(a)
    if not size or not _replayable(a):
        return set()
    chain: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    todo = [a]
    while todo:
        n = todo.pop()
        if n in chain or n in leaves:
            continue
        small = _nbytes(n) is not None and _nbytes(n) * _REPLAY_RATIO <= size
        if n is not a and (small or not _replayable(n)):
            leaves.add(n)
            continue
        chain.add(n)
        if len(chain) > _REPLAY_NODES:
            return set()
        todo.extend(n.all_input_nodes)
    kept = [_nbytes(x) for x in leaves]
    if any(b is None for b in kept) or sum(kept) * _REPLAY_RATIO > size:
        return set()
    return chain


def _replayable(n: fx.Node) -> bool:
    """A pure, deterministic aten op with a tensor result (safe to run once per block)."""
    target = n.target
    if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return isinstance(n.meta.get("val"), torch.Tensor)


def _nbytes(n: fx.Node) -> int | None:
    """Bytes of a node's tensor value at the capture's example sizes (0 for non-tensors; None if
    a size has no example value)."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return 0
    count = 1
    for d in v.shape:
        if isinstance(d, torch.SymInt):
            d = d.node.hint
            if d is None:
                return None
        count *= int(d)
    return count * v.element_size()


def recomputed_blocks(gm: fx.GraphModule) -> list[str]:
    """The block paths a graph checkpoints (report, tests)."""
    return [n.meta["ac_recompute"] for n in gm.graph.nodes if "ac_recompute" in n.meta]
