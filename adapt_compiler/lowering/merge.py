"""Merge-at-compile: fold the active adapters into the weights.

Additive methods add ΔW; multiplicative ones (OFT, BOFT, HRA, MiSS-bat) replace W by their W'.
The fold is computed in float32 (float64 weights: float64) and cast back to the weight's dtype.
The originals are kept (returned to the module), so unmerge is an assignment, bit-exact by construction.
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
    if b is None or b0 is None or torch.equal(b.to(b0.dtype), b0):
        return w, None
    return w, b.to(b0.dtype)


def merged_tensors(table) -> dict[str, torch.Tensor]:
    """FQN -> merged tensor (model layout) for every weight/bias the active adapters change."""
    check_mergeable(table.specs, table.active)
    out = {}
    for slot in table.slots.values():
        names = [n for n in table.active if n in slot.methods]
        if not names:
            continue
        layer = slot.layer
        w_key, b_key = layer.fqn + ".weight", layer.fqn + ".bias"
        steps = [(slot.methods[n], table.specs[n], slot.params(n)) for n in names]
        w, b = fold_layer(layer, steps, table.frozen[w_key], table.frozen.get(b_key) if layer.has_bias else None)
        out[w_key] = w
        if b is not None:
            out[b_key] = b
    return out


def merge_into(table) -> dict[str, torch.Tensor]:
    """Swap merged tensors into the frozen params; return the originals."""
    new = merged_tensors(table)  # computed fully before anything is swapped
    originals = {}
    for fqn, t in new.items():
        originals[fqn] = table.frozen[fqn].data
        table.frozen[fqn].data = t
    return originals


def merged_copy(table, originals: dict | None) -> nn.Module:
    """A deep copy of the user's model with the active adapters merged and modules_to_save swapped in.
    `originals`: the module's kept originals when it is merged already (its frozen tensors then hold
    the merged weights), else None."""
    new = merged_tensors(table) if originals is None else {}
    model = copy.deepcopy(table.model)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn, t in new.items():
            params[fqn].data = t.clone()
        for fqn in originals or {}:
            params[fqn].data = table.frozen[fqn].detach().clone()
    for saved in table.saved.values():
        for name in table.active:
            if name in saved.copies:
                parent_name, _, leaf = saved.fqn.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, copy.deepcopy(saved.copies[name]))
                break
    return model
