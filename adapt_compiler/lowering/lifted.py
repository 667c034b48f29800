"""Graphs of calls that carry a KV cache (prefill, decode) compiled as functions of tensors only, so
Dynamo guards the call's tensors instead of the adapted graph's module tree.

torch.compile of an adapted graph as built traces through its AdapterSlot modules, and Dynamo guards
everything that trace read from Python: each slot's adapter dict, parameter dicts, layer attributes
and the active set, ~2000 guards for a 4-layer Llama with LoRA on q/k/v/o, checked on every call.
A decode step is one call per token; torch.profiler put that check at ~0.7 ms per call (a merged
graph, with no slots: ~0.4 ms) on the loaded benchmark machine, against a ~5 ms batch-1 token. For an
eval graph compiled over flat leaves (lowering/step.py) this module instead:

* traces every slot (and modules_to_save / batched-transform module) to ATen and splices it in
  (`regional.inline_call_modules`): what a slot decides from Python state (the active adapters, the
  spec's constants, the plan's orders) is then in the graph, as lowering="regional" does;
* makes every tensor the graph reads (frozen weights, adapter tensors) an input, fetched on each call
  from the dict that holds it (a hotswap writes into the same tensors, so the next call reads them);
* keeps one compiled program per `key()`: the active adapters, their spec objects and each slot's
  tensor holders. `set_adapter`, a re-added adapter or a new spec object get a new program; a
  hotswap (same spec, same tensors) gets none.

Dynamo still guards every input tensor (shape, stride, dtype, requires_grad), so a tensor that
changes shape (a new rank) still recompiles; the lifted tensors are static inputs, the call's own
leaves keep the capture's symbolic dims (lowering/dynamic.py). Graphs whose modules read per-call
Python state (a mixed batch's adapter names, the serving pool's indices, graph-level adapters) are
compiled as built; `gm.meta["ac_lifted"]` says which way a graph went.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from ..names import POOL, PREP_PREFIX, SAVED, SLOTS

LIFTED = "ac_lifted"


def why_not(gm: fx.GraphModule) -> str | None:
    """Why `gm` cannot be compiled over lifted tensors (None: it can)."""
    if hasattr(gm, POOL):
        return "the serving pool's slot indices are per-call state"
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target == "_guards_fn":
            continue
        target = str(node.target)
        if not target.startswith((f"{SLOTS}.", f"{SAVED}.", PREP_PREFIX)):
            return f"{target} is not an adapter slot (graph-level adapters keep per-call state)"
        if node.kwargs.get("mixed") is not None:
            return "a mixed batch reads each call's adapter names"
    return None


class LiftedProgram:
    """`gm` compiled per adapter state over lifted tensors (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, compile_fn):
        self.gm, self.compile_fn = gm, compile_fn  # compile_fn(lifted graph) -> callable
        slots = list(getattr(gm, SLOTS).children()) if hasattr(gm, SLOTS) else []
        self.state = slots[0].state if slots else None
        self.holders = [s.adapters._modules for s in slots]  # per slot: adapter name -> its tensors' module
        self.programs: dict = {}  # key() -> (compiled callable, [(dict, name)] of the lifted tensors)
        gm.meta[LIFTED] = "compiled over its tensors as inputs (slots traced in; Dynamo guards the tensors only)"

    def key(self) -> tuple:
        state = self.state
        if state is None:
            return ()
        active = tuple(state.active)
        holders = tuple(id(h.get(n)) for h in self.holders for n in active)
        return active, tuple(id(state.specs.get(n)) for n in active), holders

    def __call__(self, *leaves):
        key = self.key()
        entry = self.programs.get(key)
        if entry is None:
            entry = self.programs[key] = self._build()
        fn, sources = entry
        return fn(*leaves, *[holder[name] for holder, name in sources])

    def _build(self):
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))  # shares the modules and tensors
        gm.meta = self.gm.meta
        from .regional import inline_call_modules

        inline_call_modules(gm)
        sources = _lift_tensors(gm)
        return self.compile_fn(gm), sources


def _holder(root: torch.nn.Module, target: str):
    """(the dict holding the tensor at `target`, its key): a module's _parameters/_buffers or __dict__."""
    *path, name = target.split(".")
    owner = root.get_submodule(".".join(path)) if path else root
    for d in (owner._parameters, owner._buffers, owner.__dict__):
        if isinstance(d.get(name), torch.Tensor):
            return d, name
    return None


def _lift_tensors(gm: fx.GraphModule) -> list:
    """Turn every tensor get_attr into a placeholder after the existing ones; returns where each
    lifted tensor is read from on a call, in placeholder order."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    lifted, sources = {}, []
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        source = _holder(gm, node.target)
        if source is None:
            continue  # not a tensor (left as an attribute)
        if node.target not in lifted:
            with graph.inserting_after(last):
                ph = graph.placeholder(f"lifted_{len(sources)}")
            ph.meta.update(node.meta)
            lifted[node.target], last = ph, ph
            sources.append(source)
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return sources
