"""Merge-at-compile: fold the active adapters into the weights.

Additive methods add ΔW; multiplicative ones (OFT, BOFT, HRA, MiSS-bat) replace W by their W'.
The fold is computed in float32 (float64 weights: float64) and cast back to the weight's dtype.
The originals are kept (returned to the module), so unmerge is an assignment, bit-exact by construction.
A layer whose weight is tied to another module's (GPT-2's wte / lm_head) is not folded into the shared
tensor: PEFT does fold it there, which also changes the other module (its merged model then differs
from its unmerged one); here that layer keeps its adapter as an op in the merged graph, and
merged_module() gives it an untied weight of its own.
`fold_layer` is the one rule; AdaptedModule.merge, merged_module() and the torch.compile backend's
merge=True all call it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from ..passes import method_for


def check_mergeable(specs: dict, names) -> None:
    for name in names:
        method = method_for(specs[name])
        if method.merge_kind == "none":
            raise AdapterError(
                f"merge: adapter {name!r} ({method.name}) has no weight form and cannot be merged; "
                f"use it unmerged (export with merge=False)."
            )


@torch.no_grad()
def fold_layer(layer, steps, w0: torch.Tensor, b0: torch.Tensor | None):
    """(W', b') in the model's layout and dtypes after applying each (method, spec, params) in
    `steps` to the layer's weight W0 (model layout) and bias b0; b' is None if unchanged."""
    acc = torch.promote_types(w0.dtype, torch.float32)  # half types upcast, float64 kept
    w = (w0.t() if layer.transposed else w0).to(acc)
    b = b0.to(acc) if b0 is not None else None
    for method, spec, params in steps:
        p = {k: v.to(acc) if v.is_floating_point() else v for k, v in params.items()}
        w, b = method.merged_weight(spec, layer, p, w, b)
    w = (w.t() if layer.transposed else w).to(w0.dtype).contiguous()
    if b0 is None and b is not None:
        raise AdapterError(
            f"merge: {layer.fqn} has no bias to fold the adapter's bias (lora_bias) into; PEFT cannot merge it "
            f"either. Use the adapter unmerged.")
    if b is None or b0 is None or torch.equal(b.to(b0.dtype), b0):
        return w, None
    return w, b.to(b0.dtype)


def tied_layers(table) -> set[str]:
    """Adapted layers whose weight is tied to another module's (GPT-2's wte and lm_head share one
    tensor). Merging into the shared tensor would change the other module too, so these keep their
    adapter as a separate op in the merged graph (pipeline.build), and merged_copy unties them."""
    readers: dict[int, int] = {}
    for t in table.frozen.values():
        readers[id(t)] = readers.get(id(t), 0) + 1
    # a targeted parameter (kind "parameter") is adapted wherever it is read, tied readers included, so
    # folding it into the shared tensor is exactly its unmerged meaning
    return {s.layer.fqn for s in table.slots.values() if s.layer.kind != "parameter"
            and s.layer.weight_fqn in table.frozen and readers[id(table.frozen[s.layer.weight_fqn])] > 1}


def merged_tensors(table, skip=frozenset()) -> dict[str, torch.Tensor]:
    """FQN -> merged tensor (model layout) for every weight/bias the active adapters change
    (layers in `skip` left out)."""
    check_mergeable(table.specs, table.active)
    out = {}
    for slot in table.slots.values():
        names = [n for n in table.active if n in slot.methods]
        if not names or slot.layer.fqn in skip:
            continue
        layer = slot.layer
        w_key, b_key = layer.weight_fqn, layer.bias_fqn
        steps = [(slot.methods[n], table.specs[n], slot.params(n)) for n in names]
        w, b = fold_layer(layer, steps, table.frozen[w_key], table.frozen.get(b_key) if layer.has_bias else None)
        out[w_key] = w
        if b is not None:
            out[b_key] = b
    return out


def merge_into(table) -> dict[str, torch.Tensor]:
    """Swap merged tensors into the frozen params; return the originals. Tied layers are left
    unmerged (see `tied_layers`): merged == unmerged stays exact for the module sharing the weight."""
    new = merged_tensors(table, skip=tied_layers(table))  # computed fully before anything is swapped
    originals = {}
    for fqn, t in new.items():
        originals[fqn] = table.frozen[fqn].data
        table.frozen[fqn].data = t
    return originals


def merged_copy(table, originals: dict | None) -> nn.Module:
    """A deep copy of the user's model with the active adapters merged and modules_to_save swapped in.
    `originals`: the module's kept originals when it is merged already (its frozen tensors then hold
    the merged weights), else None."""
    tied = tied_layers(table)
    new = merged_tensors(table) if originals is None else merged_tensors(table, skip=set(table.slots_fqns()) - tied)
    model = copy.deepcopy(table.model)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied_keys = {s.layer.weight_fqn for s in table.slots.values() if s.layer.fqn in tied}
    with torch.no_grad():
        for fqn, t in new.items():
            if fqn in tied_keys:  # the copy's module gets its own weight; the tied module keeps the original
                _untie(model, fqn, t.clone())
            else:
                params[fqn].data = t.clone()
        for fqn in originals or {}:
            params[fqn].data = table.frozen[fqn].detach().clone()
        for bases in table.base_originals.values():  # residual bases (PiSSA, OLoRA, CorDA) not merged above
            for fqn in bases:
                if fqn not in new and fqn not in (originals or {}):
                    params[fqn].data = table.frozen[fqn].detach().clone()
    if tied_keys and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep them apart
    for saved in table.saved.values():
        for name in table.active:
            if name in saved.copies:
                parent_name, _, leaf = saved.fqn.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, copy.deepcopy(saved.copies[name]))
                break
    return model


def _untie(model: nn.Module, fqn: str, value: torch.Tensor) -> None:
    parent, _, leaf = fqn.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
