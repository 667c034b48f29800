"""Batch the parameter-only part of an adapter across layers: one call instead of one per layer.

Some methods spend most of their extra time not on the activations but on small per-layer
transforms of their own parameters: OFT builds r Cayley(-Neumann) blocks of b×b per layer, BOFT
solves N·D Cayley systems and builds its butterfly blocks. Per layer these are a handful of tiny
batched matmuls/solves, forward and backward, each dominated by its fixed call cost. They do not
depend on the activations, so the whole graph's worth can run up front as ONE batched call over
the parameters of every layer with the same shapes (PEFT, which wraps each layer in its own
module, cannot do this). Each slot then receives its share as `prepared`.

The method decides what can be grouped (`group_key`) and computes a group (`prepare_group`);
this pass only groups the slot nodes of each adapter and wires one `GroupPrep` node per group.
"""

from __future__ import annotations

import collections
import dataclasses
import operator

from torch import fx, nn

from ..counters import COUNTERS
from ..names import PREP_PREFIX
from .plan import PLAN, slot_nodes


class GroupPrep(nn.Module):
    """Runs `prepare_group` for one adapter on a group of slots; returns one tensor per slot.

    The slots are held in a plain list, not as submodules: their parameters belong to the
    AdaptedModule (and its state_dict) once. Returns Nones when the adapter is not the one being
    applied, so the slots compute their own (the result would be unused anyway)."""

    def __init__(self, method, adapter: str, slots: list, state, training: bool):
        super().__init__()
        self.method, self.adapter, self.state, self.graph_training = method, adapter, state, training
        self.__dict__["slots"] = slots

    def forward(self):
        if self.adapter not in self.state.active:
            return (None,) * len(self.slots)
        spec = self.state.specs[self.adapter]
        params = [slot.params(self.adapter) for slot in self.slots]
        return tuple(self.method.prepare_group(spec, params, self.graph_training))


def batch_parameter_transforms(gm: fx.GraphModule, specs: dict, state, training: bool) -> int:
    """Group each adapter's activation-order slots by the method's `group_key`; wire one GroupPrep
    per group of two or more. Reads the orders the plan wrote on the nodes. Returns the number of
    layers served by a group."""
    groups = collections.defaultdict(list)  # (adapter, method, key, dtypes/devices) -> [(node, slot)]
    for node, slot in slot_nodes(gm):
        for name, method in slot.methods.items():
            if node.kwargs["orders"].get(name) != "activation":
                continue
            params = slot.params(name)
            key = method.group_key(specs[name], slot.layer, params, training)
            if key is not None:  # prepare_group concatenates the params: same dtypes and devices too
                placement = tuple((t.dtype, t.device) for t in params.values())
                groups[(name, method.name, key, placement)].append((node, slot))
    served = 0
    for i, ((name, *_), members) in enumerate(g for g in groups.items() if len(g[1]) > 1):
        nodes, slots = zip(*members)
        method = slots[0].methods[name]
        target = f"{PREP_PREFIX}_{i}"
        gm.add_submodule(target, GroupPrep(method, name, list(slots), state, training))
        with gm.graph.inserting_before(nodes[0]):
            prep = gm.graph.call_module(target, ())
        prep.meta["adapter_group"] = (name, method.name, tuple(s.layer.fqn for s in slots))
        for j, node in enumerate(nodes):
            with gm.graph.inserting_before(node):
                share = gm.graph.call_function(operator.getitem, (prep, j))
            prepared = {**(node.kwargs.get("prepared") or {}), name: share}
            node.kwargs = {**node.kwargs, "prepared": prepared}
            plan = node.meta[PLAN]
            node.meta[PLAN] = {**plan, name: dataclasses.replace(plan[name], batched_with=len(slots))}  # report()
        served += len(nodes)
    COUNTERS["layers_batched_prep"] += served
    return served
