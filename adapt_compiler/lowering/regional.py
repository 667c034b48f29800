"""lowering="regional": compile each distinct repeated block once, call it for every instance.

    gm (adapted, from pipeline.build)
      1. adapters to ATen     every call_module slot is traced (make_fx over its own tensors) and
                              spliced in; its tensors become get_attr nodes, so a block's identity is
                              purely structural. Slots that trace alike are traced once.
      2. normalise views      a reshape to its own shape is dropped, a -1 in view/reshape gets the
                              size export inferred (both pin the sequence length under
                              size-oblivious reasoning otherwise)
      3. partition            each node goes to the OUTERMOST module of its nn_module_stack whose
                              path ends in an index and whose (parent, type) repeats
                              (`model.layers.7`); get_attr nodes never do: weights and adapter
                              tensors are inputs of the block
      4. group                key = op sequence, shapes/dtypes (export's symbols as strings),
                              parameter shapes and requires_grad, which values leave the block.
                              Layers that differ (layers_to_transform, rank_pattern) get other keys
      5. compile              one representative per group with AOTAutograd + Inductor, no Dynamo
                              (aot_region.py): no recompiles for a new batch size or sequence
                              length, sizes 1 included; the glue between blocks (embedding, mask,
                              head, loss) is cut into segments and compiled the same way

Visible in the graph: every node of the adapted graph that belongs to a block carries
`node.meta["ac_region"] = "group <k>: <instance path>"`; `gm.meta["ac_regions"]` lists the groups
(report() prints them). The slots' run-time state (the active adapters) is baked in by step 1, so
a program is built per active set. Graphs this lowering does not handle (a mixed batch, graph-level
adapters, no repeated module) are compiled whole by `whole` (the "inductor" lowering), and the
reason is recorded in `gm.meta["ac_regions"]`.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import re
import time

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..names import SAVED, SLOTS
from .aot_region import AOTRegion
from .dynamic import canonical_size

KEEP_MODULES = ("_guards_fn",)


def _fake_mode(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_sym(x) -> bool:
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _val_sig(v, requires_grad=None):
    """Hashable description of a value: shapes/strides as strings so export's symbols compare equal."""
    if isinstance(v, torch.Tensor):
        return ("T", tuple(str(s) for s in v.shape), tuple(str(s) for s in v.stride()), str(v.dtype),
                str(v.device), requires_grad)
    if _is_sym(v):
        return ("S", type(v).__name__, str(v))
    if isinstance(v, (tuple, list)):
        return tuple(_val_sig(x) for x in v)
    return ("C", repr(v))


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}"


def _dynamic_dims(v) -> list[tuple[int, str]]:
    """(dim, canonical symbol expression) of each dim export made symbolic."""
    if not isinstance(v, torch.Tensor):
        return []
    out = []
    for d, size in enumerate(v.shape):
        if isinstance(size, torch.SymInt) and not size.node.is_constant():
            out.append((d, str(canonical_size(size))))
    return out


# --------------------------------------------------------------------------------------------
# 1. adapters (call_module) -> ATen, spliced into the graph
# --------------------------------------------------------------------------------------------
def inline_call_modules(gm: fx.GraphModule, keep=KEEP_MODULES) -> int:
    """Trace each `call_module` node (an adapter slot) to ATen over its own parameters/buffers and
    splice it in; the module's tensors become get_attr nodes `<target>.<name>`. Returns the count."""
    fake_mode = _fake_mode(gm)
    graph = gm.graph
    count = reused = 0
    cache = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target in keep:
            continue
        mod = gm.get_submodule(node.target)
        named = {**dict(mod.named_parameters(remove_duplicate=False)), **dict(mod.named_buffers(remove_duplicate=False))}
        names = list(named)
        flat, spec = pytree.tree_flatten((node.args, node.kwargs))
        pos = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]

        def fn(*xs, _flat=flat, _spec=spec, _pos=pos, _mod=mod, _names=names):
            leaves = list(_flat)
            for i, x in zip(_pos, xs):
                leaves[i] = x
            args, kwargs = pytree.tree_unflatten(leaves, _spec)
            return torch.func.functional_call(_mod, dict(zip(_names, xs[len(_pos):])), args, kwargs)

        fp = _slot_fingerprint(mod, [flat[i] for i in pos], named, flat)
        sub = cache.get(fp) if fp is not None else None
        if sub is None:
            with fake_mode:
                fake_in = [flat[i].meta["val"] for i in pos]
                fake_t = [fake_mode.from_tensor(t, static_shapes=True) for t in named.values()]
                sub = make_fx(fn, pre_dispatch=True)(*fake_in, *fake_t)
            if fp is not None:
                cache[fp] = sub
        else:
            reused += 1
        env = {}
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            for p, i in zip(phs, pos):
                env[p] = flat[i]
            for p, name in zip(phs[len(pos):], names):
                ga = graph.get_attr(f"{node.target}.{name}")
                ga.meta["val"] = p.meta.get("val")
                env[p] = ga
            out = None
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    continue
                if sn.op == "output":
                    out = fx.node.map_arg(sn.args[0], env.__getitem__)
                    break
                if sn.op == "get_attr":  # a constant make_fx lifted
                    attr = f"_inlined_const_{count}_{sn.target}"
                    setattr(gm, attr, getattr(sub, sn.target))
                    new = graph.get_attr(attr)
                    new.meta.update(sn.meta)
                else:
                    new = graph.node_copy(sn, env.__getitem__)
                for k in ("nn_module_stack", "stack_trace", "adapter"):
                    if k in node.meta:
                        new.meta[k] = node.meta[k]
                env[sn] = new
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.meta["inline_traces_reused"] = reused
    return count


def _slot_fingerprint(mod, inputs, named, flat):
    """A key under which two call_module nodes trace to the same ATen graph (up to which tensors
    they read), so a slot is traced once per key, not once per layer (make_fx costs ~35 ms a slot:
    3 s at 24 layers x 4 targets). Known for AdapterSlot only; any other module, a spec with
    per-layer patterns (rank_pattern/alpha_pattern resolve by FQN), or a mixed batch returns None
    = trace it."""
    if not all(hasattr(mod, a) for a in ("layer", "methods", "state", "adapters")):
        return None
    state = mod.state
    if state.mixed is not None:
        return None
    specs = []
    for name in mod.methods:
        spec = state.specs.get(name)
        if any(getattr(spec, f, None) for f in ("rank_pattern", "alpha_pattern", "layers_pattern")):
            return None
        specs.append((name, type(mod.methods[name]).__name__, repr(spec)))
    layer_desc = tuple(sorted((k, repr(v)) for k, v in vars(mod.layer).items() if k != "fqn"))
    return (type(mod).__qualname__, tuple(specs), tuple(state.active), bool(mod.training), layer_desc,
            tuple((n, tuple(t.shape), str(t.dtype), t.requires_grad) for n, t in named.items()),
            tuple(_val_sig(a.meta.get("val")) for a in inputs),
            tuple(repr(a) for a in flat if not isinstance(a, fx.Node)))


def resolve_view_minus_one(gm: fx.GraphModule) -> int:
    """view/reshape(x, [..., -1, ...]): put the size export inferred for -1 when it is a constant.

    Under size-oblivious reasoning (backed_size_oblivious) inferring -1 from numel makes the compiler
    specialise a dynamic dim (HF's `attn_output.reshape(b, -1, s, d)` pins seq), so the graph is
    given the answer export already computed."""
    views = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in views and isinstance(node.args[1], (list, tuple)):
            shape = list(node.args[1])
            val = node.meta.get("val")
            src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if (isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and node.target is not torch.ops.aten.view.default
                    and [str(d) for d in src.shape] == [str(d) for d in val.shape]):
                # reshape to its own shape: a no-op export kept; on a non-contiguous input (SDPA's
                # output) the viewability check under size-oblivious reasoning pins seq to a constant
                node.replace_all_uses_with(node.args[0])
                count += 1
                continue
            if -1 in shape and isinstance(val, torch.Tensor):
                i = shape.index(-1)
                size = val.shape[i]
                if isinstance(size, int) or (isinstance(size, torch.SymInt) and size.node.is_constant()):
                    shape[i] = int(size)
                    node.args = (node.args[0], shape, *node.args[2:])
                    count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


# --------------------------------------------------------------------------------------------
# 2. partition by repeated module
# --------------------------------------------------------------------------------------------
_INDEXED = re.compile(r"^(.+)\.(\d+)$")


def _stack(node):
    out = []
    for v in (node.meta.get("nn_module_stack") or {}).values():
        path, typ = v
        out.append((path, typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"))
    return out


def find_blocks(gm: fx.GraphModule, min_repeats: int = 2) -> dict[str, list[fx.Node]]:
    """Instance path ('model.layers.3') -> its nodes in graph order (no get_attr/placeholder)."""
    groups = collections.defaultdict(set)
    for node in gm.graph.nodes:
        for path, typ in _stack(node):
            m = _INDEXED.match(path)
            if m:
                groups[(m.group(1), typ)].add(path)
    repeated = {p for paths in groups.values() if len(paths) >= min_repeats for p in paths}
    blocks = collections.defaultdict(list)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for path, _ in _stack(node):  # outermost first
            if path in repeated:
                blocks[path].append(node)
                break
    return dict(blocks)


# --------------------------------------------------------------------------------------------
# 3. a region: nodes -> inputs/outputs/key/representative GraphModule
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Region:
    name: str
    nodes: list
    inputs: list  # external fx.Nodes, first-use order
    outputs: list  # region nodes used outside
    remat: dict  # input index -> (tensor input index, dim): SymInt inputs recomputed inside
    key: tuple = ()

    @property
    def call_inputs(self):
        return [a for k, a in enumerate(self.inputs) if k not in self.remat]


def make_region(name: str, nodes: list, root: nn.Module) -> Region:
    nodeset = set(nodes)
    inputs, seen = [], set()
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in nodeset and a not in seen:
                seen.add(a)
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in nodeset for u in n.users)]
    # SymInt inputs (batch/seq sizes computed in the glue) are re-derived from a tensor input of the
    # region, so the compiled region takes only tensors (no int inputs to specialise on)
    remat = {}
    for k, a in enumerate(inputs):
        v = a.meta.get("val")
        if isinstance(v, torch.SymInt):
            for j, t in enumerate(inputs):
                tv = t.meta.get("val")
                if isinstance(tv, torch.Tensor):
                    dims = [d for d, s in enumerate(tv.shape) if str(s) == str(v)]
                    if dims:
                        remat[k] = (j, dims[0])
                        break
    idx = {a: ("in", k) for k, a in enumerate(inputs)}
    idx.update({n: ("n", k) for k, n in enumerate(nodes)})

    def norm(x):
        return tuple(pytree.tree_leaves(fx.node.map_aggregate(
            x, lambda a: idx[a] if isinstance(a, fx.Node) else ("C", repr(a)))))

    body = tuple((n.op, _target_str(n), norm(n.args), norm(tuple(sorted(n.kwargs.items()))),
                  _val_sig(n.meta.get("val"))) for n in nodes)

    def in_sig(a):
        rg = None
        if a.op == "get_attr":
            t = _fetch_attr(root, a.target)
            rg = bool(getattr(t, "requires_grad", False))
            return ("param", _val_sig(t, rg))
        return ("act", _val_sig(a.meta.get("val")))

    key = (body, tuple(in_sig(a) for a in inputs), tuple(idx[o] for o in outputs), tuple(sorted(remat.items())))
    return Region(name, list(nodes), inputs, outputs, remat, key)


def build_representative(region: Region) -> fx.GraphModule:
    g = fx.Graph()
    env = {}
    for k, a in enumerate(region.inputs):
        if k in region.remat:
            continue
        p = g.placeholder(f"a{k}")
        p.meta["val"] = a.meta.get("val")
        env[a] = p
    for k, (j, d) in region.remat.items():
        s = g.call_function(torch.ops.aten.sym_size.int, (env[region.inputs[j]], d))
        s.meta["val"] = region.inputs[k].meta.get("val")
        env[region.inputs[k]] = s
    for n in region.nodes:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[o] for o in region.outputs))
    g.lint()
    return fx.GraphModule(nn.Module(), g)


def _replace_with_call(gm: fx.GraphModule, region: Region, target, replaced: dict) -> fx.Node:
    """Put one call_module(target) in place of the region's nodes. `replaced`: region output node ->
    the getitem that now stands for it (regions are replaced in turn, and a later region's inputs
    were recorded before)."""
    graph = gm.graph
    nodeset = set(region.nodes)
    args = tuple(replaced.get(a, a) for a in region.call_inputs)
    with graph.inserting_after(region.nodes[-1]):
        call = graph.create_node("call_module", target, args, {}, name=f"call_{_safe(region.name)}")
    outs = []
    prev = call
    for i, o in enumerate(region.outputs):
        with graph.inserting_after(prev):
            gi = graph.call_function(operator.getitem, (call, i))
        gi.meta["val"] = o.meta.get("val")
        prev = gi
        outs.append(gi)
        o.replace_all_uses_with(gi, delete_user_cb=lambda u: u not in nodeset)
        replaced[o] = gi
    for n in reversed(region.nodes):
        graph.erase_node(n)
    call.meta["region"] = region.name
    return call


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _legalize(gm):
    from torch.fx.passes.tools_common import legalize_graph

    legalize_graph(gm)
    gm.graph.lint()
    gm.recompile()


# --------------------------------------------------------------------------------------------


def _force_grad_masks(regions: list, assignment: dict, root: nn.Module) -> dict:
    """Per key: which call inputs always get requires_grad. An activation input is forced when, in some
    instance of the key, it is produced by another region that has a trainable parameter (layer k's
    residual input): then layer 0 (fed by the frozen embedding) shares layer 1..N's autograd
    specialisation instead of compiling a second variant. Inputs that never carry grad (rotary
    tables, masks) are left alone: forcing them would make the backward compute (and guard on) grads
    nobody uses."""
    owner = {}
    trainable = {}
    for r in regions:
        trainable[r.name] = any(a.op == "get_attr" and getattr(_fetch_attr(root, a.target), "requires_grad", False)
                                for a in r.inputs)
        for n in r.nodes:
            owner[n] = r.name
    masks = {}
    for r in regions:
        k = assignment[r.name]
        mask = masks.setdefault(k, [False] * len(r.call_inputs))
        for i, a in enumerate(r.call_inputs):
            v = a.meta.get("val")
            if (a in owner and trainable[owner[a]] and isinstance(v, torch.Tensor) and v.dtype.is_floating_point):
                mask[i] = True
    return masks



# --------------------------------------------------------------------------------------------
# 5. the program: partition + one AOTRegion per group and per glue segment
# --------------------------------------------------------------------------------------------
class _CallModule(nn.Module):
    """Holds a runner as a call_module target (no parameters of its own: the instance's are inputs)."""

    def __init__(self, runner):
        super().__init__()
        self.__dict__["runner"] = runner

    def forward(self, *args):
        return self.runner(*args)


def _glue_stages(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """The nodes between block calls, staged as soon as possible: stage i runs after the i-th call."""
    calls = [n for n in gm.graph.nodes if "ac_region_call" in n.meta]
    rank = {c: i for i, c in enumerate(calls)}
    stage, segments = {}, collections.defaultdict(list)
    for n in gm.graph.nodes:
        if n in rank:
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in rank:
            stage[n] = rank[n.args[0]] + 1
            continue
        if n.op in ("placeholder", "get_attr", "output", "call_module"):
            stage[n] = 0
            continue
        stage[n] = max([stage.get(a, 0) for a in n.all_input_nodes], default=0)
        segments[stage[n]].append(n)
    return segments


def compile_regions(gm: fx.GraphModule, options: dict | None = None, min_repeats: int = 2):
    """(program, groups): `program` is a GraphModule with `gm`'s signature that calls one AOTRegion
    per group of identical blocks; `groups` maps group index -> instance paths. None when `gm` has
    no repeated module."""
    import copy

    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares gm's tensors, never changes gm
    inline_call_modules(work)
    resolve_view_minus_one(work)
    blocks = find_blocks(work, min_repeats)
    if not blocks:
        return None, {}
    regions = [make_region(path, nodes, work) for path, nodes in blocks.items()]
    keys, reps, assignment = {}, {}, {}
    for r in regions:
        k = keys.setdefault(r.key, len(keys))
        assignment[r.name] = k
        if k not in reps:
            reps[k] = build_representative(r)
    masks = _force_grad_masks(regions, assignment, work)
    runners = {k: AOTRegion(rep, f"group_{k}", masks[k], options=options) for k, rep in reps.items()}
    for k, runner in runners.items():
        work.add_submodule(f"group_{k}", _CallModule(runner))
    replaced = {}
    for r in regions:
        call = _replace_with_call(work, r, f"group_{assignment[r.name]}", replaced)
        call.meta["ac_region_call"] = r.name
    _legalize(work)
    glue_keys = {}
    replaced = {}
    for s, nodes in sorted(_glue_stages(work).items()):
        if not any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target._schema.name != "aten::sym_size" for n in nodes):
            continue  # only size arithmetic: left in Python
        r = make_region(f"glue_{s}", nodes, work)
        name = f"glue_{glue_keys.setdefault(r.key, len(glue_keys))}"
        if not hasattr(work, name):
            work.add_submodule(name, _CallModule(AOTRegion(build_representative(r), name,
                                                           [False] * len(r.call_inputs), options=options)))
        _replace_with_call(work, r, name, replaced)
    _legalize(work)
    work.meta["ac_runners"] = {n: m.runner for n, m in work.named_children() if isinstance(m, _CallModule)}
    groups = collections.defaultdict(list)
    for r in regions:
        groups[assignment[r.name]].append(r.name)
    return work, dict(groups)


def _mark_groups(gm: fx.GraphModule, groups: dict) -> None:
    """node.meta["ac_region"] on the adapted graph itself (the decision, visible in the graph)."""
    group_of = {path: k for k, paths in groups.items() for path in paths}
    for node in gm.graph.nodes:
        for path, _ in _stack(node):  # outermost first, as find_blocks assigns
            if path in group_of:
                node.meta["ac_region"] = f"group {group_of[path]}: {path}"
                break


def _not_regional(gm: fx.GraphModule) -> str | None:
    """Why `gm` cannot be lowered by blocks (then it is compiled whole), or None."""
    if gm.meta.get("ac_variant") == "mixed":
        return "a mixed-batch graph (adapter_names=) reads each call's adapter per sample"
    if any(n.target is torch.utils.checkpoint.checkpoint for n in gm.graph.nodes):
        # the partition (slots traced with make_fx, blocks compiled by AOTRegion) does not take a
        # torch.utils.checkpoint call: AOTAutograd fails on it ("all flat_args must be KNOWN_TYPES")
        return "its blocks are gradient-checkpointed (gradient_checkpointing_enable() or memory_budget=)"
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in KEEP_MODULES and \
                not node.target.startswith((f"{SLOTS}.", f"{SAVED}.")):
            return f"{node.target} is a graph-level adapter whose per-call state is not baked in"
    return None


class RegionalProgram:
    """The callable `lower(gm, "regional")` returns. The adapters' active set is baked into the
    inlined graph, so one program is built (lazily, on the first call) per active set."""

    def __init__(self, gm: fx.GraphModule, options: dict | None, whole):
        self.gm, self.options, self._whole = gm, options, whole
        slots = gm.get_submodule(SLOTS) if hasattr(gm, SLOTS) else None
        first = next(iter(slots.children()), None) if slots is not None else None
        self._state = getattr(first, "state", None)
        self.programs: dict = {}  # active set -> compiled program
        reason = _not_regional(gm)
        gm.meta["ac_regions"] = {"groups": {}, "whole": reason}
        self._fallback = whole(gm, options) if reason else None

    @property
    def runners(self) -> dict:
        return {n: r for p in self.programs.values() for n, r in getattr(p, "meta", {}).get("ac_runners", {}).items()}

    def __call__(self, *args, **kwargs):
        if self._fallback is not None:
            return self._fallback(*args, **kwargs)
        active = tuple(self._state.active) if self._state is not None else ()
        program = self.programs.get(active)
        if program is None:
            t = time.perf_counter()
            program, groups = compile_regions(self.gm, self.options)
            if program is None:
                self.gm.meta["ac_regions"]["whole"] = "no repeated module (nn_module_stack) to compile once"
                self._fallback = self._whole(self.gm, self.options)
                return self._fallback(*args, **kwargs)
            _mark_groups(self.gm, groups)
            self.gm.meta["ac_regions"]["groups"] = groups
            self.gm.meta["ac_regions"]["partition_s"] = time.perf_counter() - t
            self.programs[active] = program
        return program(*args, **kwargs)


def lower_regional(gm: fx.GraphModule, options: dict | None, whole) -> RegionalProgram:
    """lowering="regional" (see the module docstring); `whole(gm, options)` compiles a graph whole."""
    return RegionalProgram(gm, options, whole)
