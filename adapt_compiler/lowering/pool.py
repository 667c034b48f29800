"""The serving pool: many LoRA adapters in preallocated slots, compiled once (S-LoRA / Punica style).

`m.reserve(max_adapters=N, max_rank=r, targets=[...])` (or `ac.compile(..., max_adapters=N,
max_rank=r)`) gives every target layer a `PoolBank`: buffers holding N adapters at once,

    lora_A [N, r, d_in]    lora_B [N, d_out, r]    scale [N]          (ranks zero-padded to r)

and the adapted graph one more node per target layer (`insert_pool`, before the weight adapters):

    y = base(x) + scale[i_b] · (x A[i_b]ᵀ) B[i_b]ᵀ      i_b = the pool slot of sample b, -1: none

computed by the `adapt_compiler::multi_lora` op (the SGMV Triton kernel on CUDA, a gathered bmm
on CPU). The slot index of every sample is a tensor the module sets before each call
(`AdapterState.pool_index`), so which adapters a batch uses, and which adapter sits in which slot,
is data: `load_adapter` of a new name writes a free slot in place, `delete_adapter` zeroes it, and
neither captures nor compiles anything. The graph reads nothing else that changes.

What fits a slot: an adapter whose method says it is plain low-rank on each of its layers
(`kernel_operands`: LoRA / rsLoRA without DoRA, on Linear or HF Conv1D), of rank <= r on every
layer (rank_pattern included), on a subset of the pool's target layers; `alpha`, `rslora` and
`alpha_pattern` become the slot's per-layer scale. When the pool is full, `evict=True` frees the
least recently used slot (touched by loading and by every call that uses it); otherwise loading
another adapter is an error that names the fix.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import fx, nn

from ..counters import COUNTERS
from ..errors import AdapterError
from ..names import BASE_ADAPTER, POOL, pool_target, slot_key
from ..passes.match import find_layer_nodes, layer_operands
from . import kernels
from .mixed import batch_of


class PoolBank(nn.Module):
    """One target layer's slots (buffers: they are served, not trained)."""

    def __init__(self, layer, capacity: int, rank: int, state, device):
        super().__init__()
        self.layer, self.state = layer, state
        dtype = layer.dtype if layer.dtype.is_floating_point else torch.float32
        self.register_buffer("lora_A", torch.zeros(capacity, rank, layer.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(capacity, layer.out_features, rank, dtype=dtype, device=device))
        self.register_buffer("scale", torch.zeros(capacity, dtype=torch.float32, device=device))

    def forward(self, x, y):
        # y = base(x) (+ the layer's regular adapters) + scale[i]·(x A[i]ᵀ) B[i]ᵀ per sample
        return kernels.add_multi_lora(x, y, self.lora_A, self.lora_B, self.scale, self.state.pool_index)


class AdapterPool(nn.Module):
    """N slots on a fixed set of target layers, and the names that occupy them (see the module doc)."""

    def __init__(self, layers: dict, capacity: int, rank: int, state, device, evict: bool = False):
        super().__init__()
        if capacity < 1 or rank < 1:
            raise AdapterError(f"reserve: max_adapters={capacity} and max_rank={rank} must both be >= 1.")
        bad = [fqn for fqn, layer in layers.items() if layer.kind != "linear"]
        if bad:
            raise AdapterError(f"reserve: the pool serves Linear / Conv1D layers only; {bad[:3]} are not. "
                               f"Narrow `targets`.")
        self.capacity, self.rank, self.evict, self.state = capacity, rank, evict, state
        self.banks = nn.ModuleDict({slot_key(fqn): PoolBank(layer, capacity, rank, state, device)
                                    for fqn, layer in layers.items()})
        self.layers = dict(layers)  # fqn -> Layer
        self.slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.specs: dict = {}  # name -> spec as loaded
        self.ranks: dict = {}  # name -> {fqn: rank}

    # -- occupancy ----------------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self.slots

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def bytes_per_adapter(self) -> int:
        """Memory one slot takes (every target layer's A, B and scale)."""
        return sum((b.lora_A[0].numel() + b.lora_B[0].numel()) * b.lora_A.element_size() + b.scale.element_size()
                   for b in self.banks.values())

    def touch(self, name: str) -> None:
        self.slots.move_to_end(name)

    def _free_slot(self, name: str) -> int:
        if name in self.slots:
            return self.slots[name]
        used = set(self.slots.values())
        free = [i for i in range(self.capacity) if i not in used]
        if free:
            return free[0]
        if not self.evict:
            raise AdapterError(
                f"the adapter pool is full ({self.capacity} adapters: {self.names[:4]}...); delete_adapter(name) "
                f"first, or reserve with evict=True to drop the least recently used adapter.")
        victim = next(iter(self.slots))
        COUNTERS["pool_evictions"] += 1
        return self.delete(victim)

    # -- filling and freeing slots ----------------------------------------------------------------------
    def check(self, name: str, spec, method, operands: dict) -> None:
        """Raise before anything is written if the adapter does not fit a slot."""
        outside = sorted(set(operands) - set(self.layers))
        if outside:
            raise AdapterError(f"adapter {name!r} targets {outside[:3]}, which are not among the pool's target "
                               f"layers; reserve a pool over them (targets=...).")
        for fqn, ops in operands.items():
            if ops is None:
                raise AdapterError(f"adapter {name!r} ({method.name}) is not plain low-rank on {fqn} (DoRA, or a "
                                   f"method other than LoRA); the pool serves LoRA / rsLoRA only.")
            rank = ops[0].shape[0]
            if rank > self.rank:
                raise AdapterError(f"adapter {name!r} has rank {rank} on {fqn}, above the pool's max_rank="
                                   f"{self.rank}; reserve a larger max_rank.")
        if getattr(spec, "modules_to_save", None):
            raise AdapterError(f"adapter {name!r} has modules_to_save, which the pool cannot hold.")

    @torch.no_grad()
    def put(self, name: str, spec, operands: dict) -> int:
        """Write an adapter into its slot (a new name takes a free one). `operands`: fqn -> (A, B, s)."""
        slot = self._free_slot(name)
        for fqn, bank in self.banks.items():
            bank.lora_A[slot].zero_()
            bank.lora_B[slot].zero_()
            bank.scale[slot] = 0.0
        for fqn, (a, b, s) in operands.items():
            bank = self.banks[slot_key(fqn)]
            r = a.shape[0]
            bank.lora_A[slot, :r].copy_(a)
            bank.lora_B[slot, :, :r].copy_(b)
            bank.scale[slot] = float(s)
        self.slots[name] = slot
        self.touch(name)
        self.specs[name] = spec
        self.ranks[name] = {fqn: a.shape[0] for fqn, (a, _, _) in operands.items()}
        COUNTERS["pool_loads"] += 1
        return slot

    @torch.no_grad()
    def delete(self, name: str) -> int:
        slot = self.slots.pop(name)
        for bank in self.banks.values():  # zeroed: a stale index can only add nothing
            bank.lora_A[slot].zero_()
            bank.lora_B[slot].zero_()
            bank.scale[slot] = 0.0
        self.specs.pop(name)
        self.ranks.pop(name)
        return slot

    def tensors_of(self, name: str) -> dict:
        """fqn -> {"lora_A": A, "lora_B": B} at the adapter's own rank (what a checkpoint holds)."""
        slot = self.slots[name]
        return {fqn: {"lora_A": self.banks[slot_key(fqn)].lora_A[slot, :r],
                      "lora_B": self.banks[slot_key(fqn)].lora_B[slot, :, :r]}
                for fqn, r in self.ranks[name].items()}

    # -- per call -------------------------------------------------------------------------------------
    def indices(self, names, batch: int, device) -> torch.Tensor:
        """The slot of each sample: `names` is one name per sample, or one name for all, or None."""
        if names is None:
            return torch.full((batch,), -1, dtype=torch.int64, device=device)
        if isinstance(names, str):
            names = [names] * batch
        for n in set(names):
            if n in self.slots:
                self.touch(n)
        return torch.tensor([self.slots.get(n, -1) if n != BASE_ADAPTER else -1 for n in names], dtype=torch.int64,
                            device=device)


def pool_indices(pool: AdapterPool, active: str | None, adapter_names, args, kwargs) -> torch.Tensor:
    """Each sample's slot for one call: from `adapter_names` (one per sample), else the active pool
    adapter for every sample, else -1 (no pool adapter)."""
    batch, device = batch_of(args, kwargs, "adapter pool")
    if adapter_names is not None:  # validated against every adapter name (check_adapter_names)
        return pool.indices(list(adapter_names), batch, device)
    if active is not None and active not in pool:
        raise AdapterError(f"the active adapter {active!r} is no longer in the pool (evicted or deleted); load it "
                           f"again, or set_adapter(...) another one.")
    return pool.indices(active, batch, device)


def insert_pool(gm: fx.GraphModule, pool: AdapterPool) -> int:
    """After each pool target layer's op: `call_module(ac_pool.<layer>)(x, y)` (see the module docstring).
    Runs before the weight adapters are inserted, so a layer with regular adapters too gets both."""
    found = find_layer_nodes(gm, set(pool.layers))
    count = 0
    for fqn, nodes in found.items():
        for node in nodes:
            x = layer_operands(node)[0]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(pool_target(fqn), (x, node))
            new.meta.update(node.meta)
            new.meta["adapter"] = (("(pool)",), "lora pool", fqn)
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            count += 1
    COUNTERS["pool_layers_inserted"] += count
    return count


__all__ = ["POOL", "AdapterPool", "PoolBank", "insert_pool", "pool_indices"]
