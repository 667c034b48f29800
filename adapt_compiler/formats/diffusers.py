"""diffusers' `save_lora_weights` layout: one pytorch_lora_weights.safetensors, keys `<component>.<module path>.<tensor>`.

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight      (PEFT's names, current)
    transformer.transformer_blocks.0.attn.to_k.lora.down.weight                          (diffusers' own spelling)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight
    unet.<path>.lokr_w1 ...                                                              (LoKr)

The safetensors metadata may hold `lora_adapter_metadata`: JSON of the LoRA/LoKr config per component
(`unet.r`, `unet.lora_alpha`, ...). With it the spec is that config; without it, ranks come from the shapes
and alphas equal the ranks (scale 1), as diffusers' `get_peft_kwargs` / `_create_lokr_config` infer them.
Key spellings are normalised with diffusers' tables (state_dict_utils: UNET_TO_DIFFUSERS,
DIFFUSERS_TO_PEFT, DIFFUSERS_OLD_TO_PEFT).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import fit_spec_to_tensors, peft_config, spec_from_config
from ..errors import AdapterError, CheckpointError
from ..names import PEFT_PREFIX
from ..passes import method_for
from ..passes.match import describe_layer
from ._foreign import (Group, ModuleWeights, adaptable_modules, build_spec, choose_group, expected_tensors, savable_spec,
                       fit_shapes, write_safetensors)

FORMAT = "diffusers"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# diffusers' spellings of a module's LoRA tensors -> PEFT's (applied in order, first hit wins per key)
SPELLINGS = (
    (".to_out_lora.down.", ".to_out.0.lora_A."), (".to_out_lora.up.", ".to_out.0.lora_B."),
    *((f".to_{x}_lora.down.", f".to_{x}.lora_A.") for x in "qkv"),
    *((f".to_{x}_lora.up.", f".to_{x}.lora_B.") for x in "qkv"),
    (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
    (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
    (".to_out.lora_magnitude_vector", ".to_out.0.lora_magnitude_vector"),
)
# old diffusers text-encoder attention names (DIFFUSERS_OLD_TO_PEFT): CLIP's q_proj etc.
TEXT_ATTENTION = {".to_q.": ".q_proj.", ".to_k.": ".k_proj.", ".to_v.": ".v_proj.", ".to_out.0.": ".out_proj."}
# PEFT tensor suffix -> (method, our parameter name)
TENSORS = {
    "lora_A.weight": ("lora", "lora_A"), "lora_B.weight": ("lora", "lora_B"),
    "lora_embedding_A": ("lora", "lora_A"), "lora_embedding_B": ("lora", "lora_B"),
    "lora_magnitude_vector": ("lora", "lora_magnitude_vector"),
    **{f"hada_{n}": ("loha", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": ("lokr", f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "alpha": (None, "alpha"),
}


def owns(key: str) -> bool:
    head, _, rest = key.partition(".")
    return head in COMPONENTS and bool(rest)


def peft_body(component: str, body: str) -> str:
    """A key after its component prefix, in PEFT's spelling (`<module path>.lora_A.weight`)."""
    body = "." + body.replace(".processor.", ".")
    for old, new in SPELLINGS:
        if old in body:
            body = body.replace(old, new)
            break
    if component.startswith("text_encoder"):
        for old, new in TEXT_ATTENTION.items():
            body = body.replace(old, new)
    return body[1:]


def _split(body: str) -> tuple[str, str] | None:
    """(module path, PEFT tensor suffix) of a normalised body."""
    for suffix in sorted(TENSORS, key=len, reverse=True):
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    return None


def groups(tensors: dict[str, torch.Tensor], metadata: dict, where: str) -> list[Group]:
    raw = metadata.get(METADATA_KEY)
    try:
        packed = json.loads(raw) if raw else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where}: its {METADATA_KEY} is not valid JSON ({err}).") from err
    found: dict[str, Group] = {}
    for key, t in tensors.items():
        component, _, body = key.partition(".")
        parts = _split(peft_body(component, body))
        if parts is None:
            hint = " (a LoRA bias: lora_bias=True is not supported)" if key.endswith(".bias") else ""
            raise CheckpointError(f"{where}: {key}: not a LoRA/LoKr tensor diffusers writes{hint}.")
        path, suffix = parts
        group = found.setdefault(component, Group(component, component))
        mw = group.modules.setdefault(path, ModuleWeights(name=path, method=""))
        mw.add(*TENSORS[suffix], t, f"{where}: {component}.{path}")
    for group in found.values():
        prefix = group.component + "."
        config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
        group.metadata = config or None
        for mw in group.modules.values():
            if not mw.method:
                raise CheckpointError(f"{where}: {group.component}.{mw.name} has an alpha but no adapter weights.")
    return list(found.values())


def resolver(model: nn.Module):
    modules = adaptable_modules(model)

    def resolve(group: Group) -> list[str]:
        missing = [f"{group.component}.{mw.name}" for mw in group.modules.values() if mw.name not in modules]
        for mw in group.modules.values():
            mw.fqn = mw.name
        return missing

    return resolve


def _build(group: Group, model: nn.Module, where: str):
    """(spec, PEFT-keyed tensors): from diffusers' metadata when the file has it (the LoraConfig /
    LoKrConfig kwargs diffusers itself loads, so PEFT's semantics), else from the shapes (scale 1)."""
    if group.metadata is None:
        return build_spec(list(group.modules.values()), model, where)
    config = dict(group.metadata)
    config.setdefault("peft_type", "LOKR" if {mw.method for mw in group.modules.values()} == {"lokr"} else "LORA")
    spec = spec_from_config(config, f"{where} ({METADATA_KEY})")
    method = method_for(spec)
    modules = dict(model.named_modules())
    layers = {mw.fqn: describe_layer(mw.fqn, modules[mw.fqn]) for mw in group.modules.values()}
    tensors = {f"{PEFT_PREFIX}{mw.fqn}.{method.peft_key(pname, layers[mw.fqn])}": t
               for mw in group.modules.values() for pname, t in mw.tensors.items()}
    spec = fit_spec_to_tensors(spec, tensors)
    return spec, fit_shapes(expected_tensors(spec, model, where), tensors, layers, where)


def read(tensors: dict[str, torch.Tensor], metadata: dict, model: nn.Module, component: str | None, where: str):
    parts = groups(tensors, metadata, where)
    group, (spec, peft_tensors) = choose_group(
        parts, model, component, resolver(model), lambda g: _build(g, model, f"{where} [{g.prefix}]"), where)
    return spec, peft_tensors, group


# -- writing -----------------------------------------------------------------------------------------
SAVABLE = ("lora", "lokr")  # what diffusers' loaders read (LoRA, DoRA included, and LoKr)


def tensors_of(table, name: str, component: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ..checkpoint import adapter_state_dict

    spec, method = savable_spec(table, name, "diffusers", SAVABLE, "diffusers' loaders read LoRA (with DoRA) and LoKr",
                                "Save it with format='kohya' (LoHa) or format='peft'.")
    if component not in COMPONENTS:
        raise AdapterError(f"save_adapter(format='diffusers'): component={component!r} is not one of {COMPONENTS}.")
    out = {f"{component}.{k[len(PEFT_PREFIX):]}": v for k, v in adapter_state_dict(table, name).items()}
    config = {k: v for k, v in peft_config(table, name).items() if v is not None}
    packed = {f"{component}.{k}": v for k, v in config.items()}
    return out, {METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=str)}


def save(table, name: str, path, component: str) -> None:
    path = Path(path)
    target = path if path.suffix == ".safetensors" else path / WEIGHT_NAME
    tensors, metadata = tensors_of(table, name, component)
    write_safetensors(target, tensors, metadata)
