"""Mixed-adapter batches: `m(**batch, adapter_names=[...])`, one adapter name per sample.

`check_adapter_names` validates the names once per call (before the graph runs) and turns them
into a `MixedBatch`: the module's adapter names (a stable tuple, so a compiled graph is not
re-specialised per batch) and a per-sample index tensor (-1 = PEFT's "__base__", no adapter).
Each AdapterSlot then calls `mixed_batch_forward`:

* LoRA on Linear / Conv1D (no DoRA, no active dropout): the slot's adapters are stacked with ranks
  zero-padded to the largest, and one `adapt_compiler::multi_lora` op adds every sample's
  s·(x Aᵢᵀ) Bᵢᵀ to the base output (the SGMV Triton kernel on CUDA, a gathered bmm on CPU);
* anything else (other methods, DoRA, dropout in training): every adapter present on the slot is
  evaluated on the whole batch and each sample keeps its own adapter's rows (`torch.where`), so
  the graph has no data-dependent shapes (the price: one evaluation per adapter on the layer).

Samples are the leading dimension of the inputs; a layer that sees flattened tokens (HF Conv1D's
`view(-1, d)`) is handled as long as its rows are batch-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..passes.method import AdapterError

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class MixedBatch:
    names: tuple[str, ...]  # every adapter of the module, in a fixed order
    indices: torch.Tensor  # [batch] int64 index into `names`, -1 = base
    per_sample: tuple[str, ...]  # the names as given (report / debugging)


def check_adapter_names(module, adapter_names, args, kwargs) -> MixedBatch:
    """Validate `adapter_names` against the module and the batch; return the per-sample indices."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise AdapterError(
            f"adapter_names must be a list with one adapter name per sample, got {type(adapter_names).__name__}."
        )
    known = tuple(module.state.specs)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known}, key=str)
    if unknown:
        raise AdapterError(f"adapter_names: unknown adapter(s) {unknown}; known: {list(known)} (or {BASE!r}).")
    if module.merged:
        raise AdapterError("adapter_names: the weights hold a merged adapter; unmerge() before a mixed batch.")
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise AdapterError("adapter_names: the inputs have no batched tensor to pair the names with.")
    batch = tensors[0].shape[0]
    if len(adapter_names) != batch:
        raise AdapterError(
            f"adapter_names has {len(adapter_names)} names for a batch of {batch} samples; give one name per sample."
        )
    index = {n: i for i, n in enumerate(known)}
    indices = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=tensors[0].device)
    return MixedBatch(known, indices, tuple(adapter_names))


def _stackable(slot, names, training: bool) -> bool:
    from .kernels import kernel_applies

    layer = slot.layer
    return all(kernel_applies(slot.methods[n], slot.state.specs[n], layer, training) for n in names)


def _select(mask, new, old):
    """Per sample (leading dim of `mask`), take `new` where mask else `old`; batch-major layouts."""
    bsz = mask.shape[0]
    shape = old.shape
    return torch.where(mask[:, None], new.reshape(bsz, -1), old.reshape(bsz, -1)).reshape(shape)


def mixed_batch_forward(slot, x, weight, bias):
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
    if _stackable(slot, names, slot.training):
        from ..passes.lora import scaling_of
        from .kernels import add_multi_lora

        params = [slot.params(n) for n in names]
        rank = max(p["lora_A"].shape[0] for p in params)
        dt = x.dtype
        # ranks zero-padded to the largest: exact (zero rows of A / columns of B add nothing)
        a = torch.stack([torch.nn.functional.pad(p["lora_A"].to(dt), (0, 0, 0, rank - p["lora_A"].shape[0]))
                         for p in params])
        b = torch.stack([torch.nn.functional.pad(p["lora_B"].to(dt), (0, rank - p["lora_B"].shape[1]))
                         for p in params])
        s = torch.tensor([scaling_of(slot.state.specs[n], layer) for n in names], dtype=torch.float32,
                         device=x.device)
        return add_multi_lora(x, out, a, b, s, local)
    for i, name in enumerate(names):  # each adapter on the whole batch; every sample keeps its own rows
        out = _select(local == i, slot.evaluate(name, x, weight, bias), out)
    return out
