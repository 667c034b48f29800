"""Merge-at-compile: fold the active adapters into the weights.

Additive methods add ΔW; multiplicative ones (OFT, BOFT, HRA, MiSS-bat) replace W by their W'.
The fold is computed in float32 (float64 weights: float64) and cast back to the weight's dtype.
The originals are kept (returned to the module), so unmerge is an assignment, bit-exact by construction.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..passes import method_for
from ..passes.method import AdapterError


def _check_mergeable(module) -> None:
    for name in module.state.active:
        method = method_for(module.state.specs[name])
        if method.merge_kind == "none":
            raise AdapterError(
                f"merge: adapter {name!r} ({method.name}) has no weight form and cannot be merged; "
                f"use it unmerged (export with merge=False)."
            )


def merged_tensors(module) -> dict[str, torch.Tensor]:
    """FQN -> merged tensor (model layout) for every weight/bias the active adapters change."""
    _check_mergeable(module)
    out = {}
    with torch.no_grad():
        for slot in module.slots.values():
            names = [n for n in module.state.active if n in slot.methods]
            if not names:
                continue
            layer = slot.layer
            w_key, b_key = layer.fqn + ".weight", layer.fqn + ".bias"
            w0 = module._frozen[w_key]
            b0 = module._frozen.get(b_key) if layer.has_bias else None
            # at least float32 (half types are upcast, float64 is kept), then cast back to w0's dtype
            acc = torch.promote_types(w0.dtype, torch.float32)
            w = (w0.t() if layer.transposed else w0).to(acc)
            b = b0.to(acc) if b0 is not None else None
            for name in names:
                p = {k: v.to(acc) if v.is_floating_point() else v for k, v in slot.params(name).items()}
                w, b = slot.methods[name].merged_weight(module.state.specs[name], layer, p, w, b)
            w = w.t() if layer.transposed else w
            out[w_key] = w.to(w0.dtype).contiguous()
            if b is not None and b0 is not None and not torch.equal(b.to(b0.dtype), b0):
                out[b_key] = b.to(b0.dtype)
    return out


def merge_into(module) -> dict[str, torch.Tensor]:
    """Swap merged tensors into the module's frozen params; return the originals."""
    new = merged_tensors(module)  # computed fully before anything is swapped
    originals = {}
    for fqn, t in new.items():
        originals[fqn] = module._frozen[fqn].data
        module._frozen[fqn].data = t
    return originals


def merged_copy(module) -> nn.Module:
    """A deep copy of the user's model with the active adapters merged and modules_to_save swapped in."""
    new = merged_tensors(module) if not module.merged else {}
    model = copy.deepcopy(module._model)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn, t in new.items():
            params[fqn].data = t.clone()
        if module.merged:
            for fqn in module._originals:
                params[fqn].data = module._frozen[fqn].detach().clone()
    for saved in module.saved.values():
        for name in module.state.active:
            if name in saved.copies:
                parent_name, _, leaf = saved.fqn.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, copy.deepcopy(saved.copies[name]))
                break
    return model
