"""kohya-ss / LyCORIS single-file adapters: `<prefix>_<module path with "_">.<tensor>` in one .safetensors.

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, d_in[, kh, kw])
    lora_unet_..._to_q.lora_up.weight      (d_out, r[, 1, 1])       .alpha  scalar   .dora_scale (d_out, 1[, 1, 1])
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a  (LoHa: hada_w1_a/b, hada_w2_a/b[, hada_t1/t2])
    lora_unet_..._conv1.lokr_w1 / lokr_w1_a / lokr_w1_b / lokr_w2 / lokr_w2_a / lokr_w2_b / lokr_t2   (LoKr)

Prefixes: `lora_unet` (the UNet, or a transformer trained by kohya), `lora_transformer` (OneTrainer's
transformers), `lycoris` (LyCORIS wrapping a diffusers model), `lora_te` / `lora_te1` (text_encoder),
`lora_te2`, `lora_te3`. A module name is kohya's rule applied to the model's own module paths (prefix +
path with "." replaced by "_"); names that are not (SDXL's sgm block names such as `input_blocks_4_1`)
go through diffusers' converter (`_maybe_map_sgm_blocks_to_diffusers`, `_convert_unet_lora_key`) when
diffusers is installed.

Scales, as LyCORIS, ComfyUI and diffusers apply them: LoRA and LoHa alpha / rank (no alpha: 1); LoKr
alpha / rank when a factor is rank-decomposed, 1 when both factors are full (diffusers'
`_bake_lokr_alpha_`). The tensors themselves have PEFT's layouts, so they load unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, CheckpointError
from ._foreign import (DENOISERS, Group, ModuleWeights, adaptable_modules, build_spec, choose_group, savable_spec,
                       write_safetensors)

FORMAT = "kohya"
# file prefix -> component (diffusers' pipeline attribute), longest first where one is a prefix of another
PREFIXES = {
    "lora_unet": "unet", "lora_transformer": "transformer", "lycoris": "unet",
    "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3", "lora_te": "text_encoder",
}
WRITE_PREFIX = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te1",
                "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
# tensor name in the file -> (method, our parameter name); method None: belongs to whichever method the module has
TENSORS = {
    "lora_down.weight": ("lora", "lora_A"), "lora_up.weight": ("lora", "lora_B"),
    "dora_scale": (None, "lora_magnitude_vector"), "alpha": (None, "alpha"),
    **{f"hada_{n}": ("loha", f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": ("lokr", f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
# what LyCORIS / kohya also write and PEFT has no method for: refused by name
UNSUPPORTED = {
    "lora_mid.weight": "LoCon's Tucker core (LyCORIS use_tucker)",
    "oft_blocks": "LyCORIS' OFT (its parametrisation is not PEFT's OFT)",
    "oft_diag": "LyCORIS' diag-OFT",
    "rescale": "LyCORIS' OFT rescale",
    "diff": "a full weight difference (LyCORIS `full`)",
    "diff_b": "a full bias difference (LyCORIS `full`)",
    "w_norm": "norm-layer tuning (LyCORIS `w_norm`)",
    "b_norm": "norm-layer tuning (LyCORIS `b_norm`)",
    "scalar": "LyCORIS' learned scalar (use_scalar)",
    "lora_up.bias": "a LoRA bias",
    "lora_down.bias": "a LoRA bias",
}
REQUIRED = {"lora": ({"lora_A", "lora_B"},), "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},)}


def split_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, module name, tensor name) of a kohya key, or None if it is not one."""
    name, _, tensor = key.partition(".")
    for prefix in PREFIXES:
        if name.startswith(prefix + "_") and tensor:
            return prefix, name[len(prefix) + 1:], tensor
    return None


def owns(key: str) -> bool:
    return split_key(key) is not None


# -- reading -----------------------------------------------------------------------------------------
def groups(tensors: dict[str, torch.Tensor], where: str) -> list[Group]:
    """The file's parts (one per prefix), every module's tensors renamed and checked for completeness."""
    found: dict[str, Group] = {}
    for key, t in tensors.items():
        prefix, name, tensor = split_key(key)
        if tensor in UNSUPPORTED:
            raise CheckpointError(
                f"{where}: {key}: {UNSUPPORTED[tensor]} has no PEFT method; adapt_compiler loads kohya/LyCORIS LoRA "
                f"(lora_down/lora_up/alpha, dora_scale), LoHa (hada_*) and LoKr (lokr_*)."
            )
        if tensor not in TENSORS:
            raise CheckpointError(f"{where}: {key}: unknown kohya/LyCORIS tensor {tensor!r}; known: "
                                  f"{', '.join(sorted(TENSORS))}.")
        group = found.setdefault(prefix, Group(PREFIXES[prefix], prefix))
        mw = group.modules.setdefault(name, ModuleWeights(name=f"{prefix}_{name}", method=""))
        mw.add(*TENSORS[tensor], t, f"{where}: {mw.name}")
    for group in found.values():
        for mw in group.modules.values():
            _check_complete(mw, where)
    return list(found.values())


def _check_complete(mw: ModuleWeights, where: str) -> None:
    have = set(mw.tensors)
    if not mw.method:
        raise CheckpointError(f"{where}: {mw.name} has only {sorted(have) or ['alpha']}, no adapter weights.")
    if "lora_magnitude_vector" in have and mw.method != "lora":
        raise CheckpointError(f"{where}: {mw.name}: DoRA (dora_scale) on {mw.method}: PEFT's {mw.method} has no DoRA.")
    if mw.method == "lokr":
        w1 = "lokr_w1" in have or {"lokr_w1_a", "lokr_w1_b"} <= have
        w2 = "lokr_w2" in have or {"lokr_w2_a", "lokr_w2_b"} <= have
        missing = ([] if w1 else ["lokr_w1 (or lokr_w1_a + lokr_w1_b)"]) + ([] if w2 else ["lokr_w2 (or lokr_w2_a + lokr_w2_b)"])
    else:
        missing = sorted(REQUIRED[mw.method][0] - have)
        if mw.method == "loha" and ("hada_t1" in have) != ("hada_t2" in have):
            missing.append("hada_t1 and hada_t2 (both or neither)")
    if missing:
        raise CheckpointError(f"{where}: {mw.name} lacks {', '.join(missing)}; the file is incomplete.")


def _index(model: nn.Module) -> dict[str, str | None]:
    """kohya name (path with "_") -> module path; None where two paths collapse to one name."""
    out: dict[str, str | None] = {}
    for fqn in adaptable_modules(model):
        name = fqn.replace(".", "_")
        out[name] = None if name in out else fqn
    return out


def _via_diffusers(name: str, model: nn.Module) -> str | None:
    """Module path of a kohya UNet name in SDXL's sgm spelling, by diffusers' own converter."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:
        return None
    key = f"lora_unet_{name}.lora_down.weight"
    try:  # one key at a time: the sgm renaming of a key depends only on its block ids and layers_per_block
        (key,) = _maybe_map_sgm_blocks_to_diffusers({key: None}, getattr(model, "config", None))
        (peft_key,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): None})
    except Exception:  # noqa: BLE001 - a name the converter does not know stays unresolved (reported)
        return None
    return peft_key.removesuffix(".lora_A.weight") if peft_key.endswith(".lora_A.weight") else None


# CLIP's module paths lost their `text_model.` wrapper in transformers 5; kohya names keep it
CLIP_WRAPPER = "text_model_"


def _clip_without_wrapper(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")


def resolver(model: nn.Module):
    index = _index(model)
    modules = adaptable_modules(model)
    unwrap = _clip_without_wrapper(model)

    def resolve(group: Group) -> list[str]:
        missing = []
        for name, mw in group.modules.items():
            if unwrap and name.startswith(CLIP_WRAPPER):
                name = name[len(CLIP_WRAPPER):]
            fqn = index.get(name)
            if fqn is None and group.component in DENOISERS:
                fqn = _via_diffusers(name, model)
            if fqn is None or fqn not in modules:
                missing.append(mw.name)
            mw.fqn = fqn
        return missing

    return resolve


def read(tensors: dict[str, torch.Tensor], model: nn.Module, component: str | None, where: str):
    """(spec, PEFT-keyed tensors, the group used) for `model` from a kohya/LyCORIS file's tensors."""
    parts = groups(tensors, where)
    group, (spec, peft_tensors) = choose_group(
        parts, model, component, resolver(model),
        lambda g: build_spec(list(g.modules.values()), model, f"{where} [{g.prefix}]"), where)
    return spec, peft_tensors, group


# -- writing -----------------------------------------------------------------------------------------
SAVABLE = ("lora", "loha", "lokr")


def tensors_of(table, name: str, component: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya-keyed tensors and metadata of adapter `name` (refusing what the format cannot hold)."""
    spec, method = savable_spec(table, name, "kohya", SAVABLE, "kohya/LyCORIS files hold LoRA, LoHa and LoKr",
                                "Save it as a PEFT directory (format='peft').")
    if component not in WRITE_PREFIX:
        raise AdapterError(f"save_adapter(format='kohya'): component={component!r} has no kohya prefix; use one of "
                           f"{sorted(WRITE_PREFIX)}.")
    prefix = WRITE_PREFIX[component] + ("_" + CLIP_WRAPPER[:-1] if _clip_without_wrapper(table.model) else "")
    out = {}
    for slot in table.slots_of(name):
        layer = slot.layer
        if layer.kind == "embedding" or layer.transposed or (layer.kind == "conv2d" and layer.groups > 1):
            what = "an embedding" if layer.kind == "embedding" else "an HF Conv1D" if layer.transposed else "a grouped conv"
            raise AdapterError(f"save_adapter(format='kohya'): {layer.fqn} is {what}, which kohya/LyCORIS files "
                               f"cannot hold; save it with format='peft', or exclude it from targets.")
        p = {k: v.detach() for k, v in method.saved_tensors(spec, layer, slot.adapters[name].as_dict()).items()}
        base = f"{prefix}_{layer.fqn.replace('.', '_')}"
        for k, v in _module_tensors(method, spec, layer, p).items():
            out[f"{base}.{k}"] = v
    algo = {"lora": None, "loha": "loha", "lokr": "lokr"}[method.name]
    metadata = {"ss_network_module": "networks.lora" if algo is None else "lycoris.kohya",
                "ss_network_dim": str(spec.r), "ss_network_alpha": str(spec.alpha)}
    if algo:
        args = {"algo": algo}
        if algo == "lokr":
            args.update(factor=spec.decompose_factor, decompose_both=spec.decompose_both)
        if spec.use_effective_conv2d:
            args["use_tucker"] = True
        metadata["ss_network_args"] = json.dumps(args)
    return out, metadata


def _module_tensors(method, spec, layer, p) -> dict[str, torch.Tensor]:
    """One layer's tensors under kohya names, with an alpha that makes the file's scale equal ours."""
    scale = method.scaling(spec, layer)
    if method.name == "lora":
        out = {"lora_down.weight": p["lora_A"], "lora_up.weight": p["lora_B"]}
        r = p["lora_A"].shape[0]
        if "lora_magnitude_vector" in p:  # LyCORIS' output-axis DoRA scale: (d_out, 1[, 1, 1])
            out["dora_scale"] = p["lora_magnitude_vector"].reshape(layer.out_features, *[1] * (len(layer.weight_shape) - 1))
    elif method.name == "loha":
        out = dict(p)
        r = p["hada_w1_b"].shape[0]
    else:
        out = dict(p)
        if not ("lokr_w1_b" in p or "lokr_w2_b" in p):
            # both factors full: LyCORIS applies no scale, so ours goes into W1
            out["lokr_w1"] = p["lokr_w1"] * scale
            return out
        r = (p["lokr_w2_b"] if "lokr_w2_b" in p else p["lokr_w1_b"]).shape[0]
    out["alpha"] = torch.tensor(scale * r, dtype=torch.float32)
    return out


def save(table, name: str, path, component: str) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"save_adapter(format='kohya'): {path} must be a .safetensors file path "
                           f"(kohya/LyCORIS adapters are single files).")
    tensors, metadata = tensors_of(table, name, component)
    write_safetensors(path, tensors, metadata)
