"""Mixed-adapter batches: `m(**batch, adapter_names=[...])`, one adapter name per sample.

`check_adapter_names` validates the names once per call (before the graph runs) and turns them
into a `MixedBatch`: the module's adapter names (a stable tuple, so a compiled graph is not
re-specialised per batch) and a per-sample index tensor (-1 = PEFT's "__base__", no adapter).
The call runs the module's "mixed" graph, in which the plan (lowering/plan.py) wrote on each
slot node which implementation serves it, and each AdapterSlot calls `mixed_batch_forward`:

* "multi_lora", where every adapter on the layer is plain low-rank (`kernel_operands`: LoRA on
  Linear / Conv1D, no DoRA, no active dropout): the slot's adapters are stacked with ranks
  zero-padded to the largest, and one `adapt_compiler::multi_lora` op adds every sample's
  s·(x Aᵢᵀ) Bᵢᵀ to the base output (the SGMV Triton kernel on CUDA, a gathered bmm on CPU);
* "select", anything else (other methods, DoRA, dropout in training): every adapter present on the
  slot is evaluated on the whole batch and each sample keeps its own adapter's rows
  (`torch.where`), so the graph has no data-dependent shapes (the price: one evaluation per
  adapter on the layer).

Samples are the leading dimension of the inputs; a layer that sees flattened tokens (HF Conv1D's
`view(-1, d)`) is handled as long as its rows are batch-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..errors import AdapterError
from ..names import BASE_ADAPTER as BASE
from . import kernels


@dataclass
class MixedBatch:
    names: tuple[str, ...]  # every adapter of the module, in a fixed order
    indices: torch.Tensor  # [batch] int64 index into `names`, -1 = base
    per_sample: tuple[str, ...]  # the names as given (report / debugging)


def check_adapter_names(table, merged: bool, adapter_names, args, kwargs) -> MixedBatch:
    """Validate `adapter_names` against the adapters and the batch; return the per-sample indices."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise AdapterError(
            f"adapter_names must be a list with one adapter name per sample, got {type(adapter_names).__name__}."
        )
    known = tuple(table.specs)  # the graph's adapters; the serving pool's are indexed by its own slots
    unknown = sorted({n for n in adapter_names if n != BASE and n not in table.names()}, key=str)
    if unknown:
        raise AdapterError(f"adapter_names: unknown adapter(s) {unknown}; known: {table.names()} (or {BASE!r}).")
    if merged:
        raise AdapterError("adapter_names: the weights hold a merged adapter; unmerge() before a mixed batch.")
    batch, device = batch_of(args, kwargs, "adapter_names")
    if len(adapter_names) != batch:
        raise AdapterError(
            f"adapter_names has {len(adapter_names)} names for a batch of {batch} samples; give one name per sample."
        )
    index = {n: i for i, n in enumerate(known)}
    indices = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
    return MixedBatch(known, indices, tuple(adapter_names))


def batch_of(args, kwargs, what: str) -> tuple[int, torch.device]:
    """(batch size, device) of a call: the leading dim of its first batched tensor input."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise AdapterError(f"{what}: the inputs have no batched tensor to pair the adapters with.")
    return tensors[0].shape[0], tensors[0].device


def mixed_impl(slot, training: bool) -> str:
    """How a slot serves a mixed batch (recorded on its node by the plan): "multi_lora" when every
    adapter on it is plain low-rank (`kernel_operands`), else "select"."""
    names = list(slot.methods)
    ok = all(slot.methods[n].kernel_operands(slot.state.specs[n], slot.layer, slot.params(n), training) is not None
             for n in names)
    return "multi_lora" if ok else "select"


def _select(mask, new, old):
    """Per sample (leading dim of `mask`), take `new` where mask else `old`; batch-major layouts."""
    bsz = mask.shape[0]
    shape = old.shape
    return torch.where(mask[:, None], new.reshape(bsz, -1), old.reshape(bsz, -1)).reshape(shape)


def mixed_batch_forward(slot, x, weight, bias, orders: dict, training: bool, impl: str):
    """The slot's output when every sample has its own adapter (see the module docstring)."""
    mb: MixedBatch = slot.state.mixed
    layer = slot.layer
    names = [n for n in mb.names if n in slot.methods]  # adapters that touch this layer
    out = layer.base(x, weight, bias)
    if not names:
        return out
    # global index -> index among this slot's adapters (-1: base on this layer)
    lut = torch.tensor([names.index(n) if n in names else -1 for n in mb.names] + [-1],
                       dtype=torch.int64, device=mb.indices.device)
    local = lut[torch.where(mb.indices < 0, len(mb.names), mb.indices)]
    if impl == "multi_lora":
        dt = x.dtype
        ops = [slot.methods[n].kernel_operands(slot.state.specs[n], layer, slot.params(n), training) for n in names]
        rank = max(a.shape[0] for a, _, _ in ops)
        # ranks zero-padded to the largest: exact (zero rows of A / columns of B add nothing)
        a = torch.stack([torch.nn.functional.pad(a.to(dt), (0, 0, 0, rank - a.shape[0])) for a, _, _ in ops])
        b = torch.stack([torch.nn.functional.pad(b.to(dt), (0, rank - b.shape[1])) for _, b, _ in ops])
        s = torch.tensor([float(s) for _, _, s in ops], dtype=torch.float32, device=x.device)
        return kernels.add_multi_lora(x, out, a, b, s, local)
    for i, name in enumerate(names):  # each adapter on the whole batch; every sample keeps its own rows
        new = slot.evaluate(name, x, weight, bias, orders[name], training)
        out = _select(local == i, new, out)
    return out
