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
import statistics
import warnings

import torch
from torch import nn

from ..errors import AdapterError
from ..passes import method_for
from ..quant import KINDS as QUANT_KINDS
from ..quant import operand_key
from ..quant.weight import frozen_weight


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


def check_unquantized(table, what: str) -> None:
    """Merging in place is refused over quantized layers: their frozen weights are packed, and
    re-quantizing W + ΔW keeps only a few percent of a typical adapter update."""
    for slot in table.slots.values():
        if slot.layer.quant is not None and any(n in slot.methods for n in table.active):
            raise AdapterError(
                f"{what}: {slot.layer.fqn} is a {slot.layer.quant.scheme} layer; the adapters are not merged into "
                f"quantized weights in place (re-quantizing W + ΔW loses most of a typical update). Keep the module "
                f"unmerged (in eval the compiler already folds ΔW into the dequantized weight where that is faster), "
                f"or take m.merged_module() (dequantized) / m.merged_module(requantize=True)."
            )


def dense_weight(table, layer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A quantized layer's weight dequantized from the frozen operands (transient)."""
    operands = {name: table.frozen.get(operand_key(layer.fqn, name)) for name in layer.quant.operands}
    return frozen_weight(layer.quant, operands, dtype or layer.dtype).dequantize()


def _merged_layer(table, slot):
    """(W', b') of one slot with the active adapters folded in, or None if none is active there.
    Over a quantized layer W' is float32 (dequantized in the layer's dtype, then W + ΔW in float32,
    as PEFT's merge computes it before re-quantizing)."""
    names = [n for n in table.active if n in slot.methods]
    if not names:
        return None
    layer = slot.layer
    steps = [(slot.methods[n], table.specs[n], slot.params(n)) for n in names]
    b0 = table.frozen.get(layer.bias_fqn) if layer.has_bias else None
    w0 = table.frozen[layer.weight_fqn] if layer.quant is None else dense_weight(table, layer).float()
    return fold_layer(layer, steps, w0, b0)


def merged_tensors(table, skip=frozenset()) -> dict[str, torch.Tensor]:
    """FQN -> merged tensor (model layout) for every weight/bias the active adapters change
    (layers in `skip` left out; quantized layers are merged by merged_copy's `_quantized_layers`)."""
    check_mergeable(table.specs, table.active)
    out = {}
    for slot in table.slots.values():
        if slot.layer.fqn in skip or slot.layer.quant is not None:
            continue
        merged = _merged_layer(table, slot)
        if merged is None:
            continue
        w, b = merged
        out[slot.layer.weight_fqn] = w
        if b is not None:
            out[slot.layer.bias_fqn] = b
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


def merged_copy(table, originals: dict | None, requantize: bool = False) -> nn.Module:
    """A deep copy of the user's model with the active adapters merged and modules_to_save swapped in.
    `originals`: the module's kept originals when it is merged already (its frozen tensors then hold
    the merged weights), else None. Quantized layers: see `_quantized_layers`."""
    tied = tied_layers(table)
    new = merged_tensors(table) if originals is None else merged_tensors(table, skip=set(table.slots_fqns()) - tied)
    memo, errors = _quantized_layers(table, requantize) if table.quant else ({}, {})
    model = copy.deepcopy(table.model, memo)
    if table.quant and not requantize:
        _mark_dequantized(model)
    if errors:
        model.ac_requantization_error = errors  # layer FQN -> ‖requant(W') − W'‖ / ‖ΔW‖
        _warn_rounding(errors)
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


def _quantized_layers(table, requantize: bool) -> tuple[dict, dict]:
    """(deepcopy memo: each quantized layer of the model -> its replacement in the merged copy,
    layer FQN -> rounding error of each re-quantized merged layer).

    Without `requantize`: an `nn.Linear` in the layer's own dtype holding the dequantized weight,
    with the active adapters folded in where they sit. With it: a new layer of the same kind holding
    W + ΔW quantized afresh (PEFT's merge_and_unload over a quantized base); untouched layers are
    re-quantized from their dequantized weight, which gives back the same codes and scales. One layer
    at a time, so at most one full-precision weight exists besides the copy being built."""
    modules = dict(table.model.named_modules())
    slots = {s.layer.fqn: s for s in table.slots.values()}
    check_mergeable(table.specs, table.active)
    memo, errors = {}, {}
    for fqn, info in table.quant.items():
        module = modules[fqn]
        slot = slots.get(fqn)
        merged = _merged_layer(table, slot) if slot is not None else None
        layer = slot.layer if slot is not None else None
        if merged is None:
            w = dense_weight(table, layer) if layer is not None else _dense_of(table, fqn, info)
            bias = None
        else:
            w, bias = merged
        if requantize:
            new = QUANT_KINDS[info.kind].quantize(module, info, w)
            if merged is not None:
                errors[fqn] = _rounding_error(table, layer, new, w)
        else:
            new = nn.Linear(info.in_features, info.out_features, bias=module.bias is not None, device="meta",
                            dtype=info.dtype)
            new.weight = nn.Parameter(w.detach().to(info.dtype).contiguous(), requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            new.train(module.training)
        if bias is not None and new.bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias)
        memo[id(module)] = new
    return memo, errors


def _dense_of(table, fqn: str, info) -> torch.Tensor:
    operands = {name: table.frozen.get(operand_key(fqn, name)) for name in info.operands}
    return frozen_weight(info, operands, info.dtype).dequantize()


def _rounding_error(table, layer, new_module, merged: torch.Tensor) -> float:
    """‖requantized W' − W'‖ / ‖ΔW‖: 0 keeps the whole update, 1 loses as much as the update's size."""
    kind = QUANT_KINDS[layer.quant.kind]
    info = kind.describe(new_module, layer.dtype)
    operands = kind.operands(new_module)
    requantized = frozen_weight(info, operands, torch.float32).dequantize()
    delta = merged - dense_weight(table, layer).float()
    return float((requantized - merged).norm() / delta.norm().clamp_min(1e-30))


def _warn_rounding(errors: dict) -> None:
    values = sorted(errors.values())
    worst = max(errors, key=errors.get)
    warnings.warn(
        f"merged_module(requantize=True): re-quantizing W + ΔW rounds away part of the adapters' update: "
        f"‖requant(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖ is {statistics.median(values):.3g} (median over {len(values)} layers), "
        f"{errors[worst]:.3g} at worst ({worst}); near or above 1 the merged model has lost most of the update. "
        f"The figures are on the returned module as `ac_requantization_error`. merged_module() without "
        f"requantize keeps the update exactly (dequantized weights).",
        stacklevel=4,
    )


def _mark_dequantized(model: nn.Module) -> None:
    """A transformers model copy whose layers are all dequantized no longer loads as quantized."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if isinstance(getattr(model, attr, None), bool):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
