"""Hotswap: replace an adapter's weights in place, so compiled graphs keep serving without recompiling.

`load_adapter(dir, name, hotswap=True)` (checkpoint.py) calls `check_hotswap` before touching any
tensor, copies the checkpoint into the existing parameters (a smaller rank is zero-padded to the
compiled one), then `rescale_after_hotswap`.

Compiled graphs bake the adapter's spec in as Python constants (the LoRA scaling s = α/r or α/√r
is a float in the graph, and Dynamo guards on the spec's fields), so the compiled spec stays and
the new adapter's scaling is folded into its weights instead:

    s_old · (x Aᵀ)(B · s_new/s_old)ᵀ  =  s_new · (x Aᵀ) Bᵀ

Only the tensors' values change (same objects, same shapes, same dtypes): no guard fails, nothing
recompiles. Methods other than LoRA hotswap when their spec is unchanged apart from targeting.
"""

from __future__ import annotations

import dataclasses

import torch

from ..passes import method_for
from ..passes.method import AdapterError

# LoRA spec fields a hotswap may change: the scaling ones are folded into B; init is history; the
# compiled dropout p stays (hotswap serves inference)
_LORA_FOLDABLE = {"r", "alpha", "rslora", "rank_pattern", "alpha_pattern", "init", "dropout"}
_TARGETING = {"targets", "exclude", "modules_to_save", "layers_to_transform", "order"}


def _changed(old, new) -> set[str]:
    if type(old) is not type(new):
        return {"method"}
    return {f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)}


def check_hotswap(module, name: str, new_spec) -> None:
    """Raise before anything is copied if `new_spec` cannot replace adapter `name` in place."""
    if name not in module.state.specs:
        raise AdapterError(f"hotswap: no adapter named {name!r} to replace; known: {list(module.state.specs)}.")
    old = module.state.specs[name]
    if module.merged and name in module.state.active:
        raise AdapterError(f"hotswap: adapter {name!r} is merged into the weights; unmerge() first.")
    changed = _changed(old, new_spec) - _TARGETING
    if "method" in changed:
        raise AdapterError(
            f"hotswap: adapter {name!r} is {type(old).__name__}, the checkpoint is {type(new_spec).__name__}; "
            f"hotswap needs the same method (use load_adapter without hotswap to add it as a new adapter)."
        )
    foldable = _LORA_FOLDABLE if method_for(old).name == "lora" else set()
    fixed = changed - foldable
    if fixed:
        raise AdapterError(
            f"hotswap: adapter {name!r} differs from the checkpoint in {sorted(fixed)}, which the compiled graph "
            f"bakes in; load it without hotswap (a recompile), or save it with the same settings."
        )


def rescale_after_hotswap(module, name: str, new_spec) -> None:
    """Fold the checkpoint's scaling into B so the compiled scaling stays valid (LoRA)."""
    old = module.state.specs[name]
    if method_for(old).name != "lora":
        return
    from ..passes.lora import scaling_of

    with torch.no_grad():
        for slot in module.slots_of(name):
            ratio = scaling_of(new_spec, slot.layer) / scaling_of(old, slot.layer)
            if ratio != 1.0:
                b = slot.params(name)["lora_B"]
                b.copy_((b.double() * ratio).to(b.dtype))  # one rounding, in place: same tensor object
