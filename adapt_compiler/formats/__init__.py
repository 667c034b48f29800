"""Adapter files in the formats the ecosystem shares, in and out; this module picks the format.

    peft       a PEFT adapter directory: adapter_config.json + adapter_model.safetensors   (checkpoint.py)
    kohya      kohya-ss / LyCORIS single .safetensors: lora_unet_..., lora_te1_..., LoRA/LoHa/LoKr  (kohya.py)
    diffusers  diffusers' save_lora_weights: pytorch_lora_weights.safetensors, unet./transformer./text_encoder. (diffusers.py)

`read_adapter(path, model)` returns what `checkpoint.read_adapter` returns for a PEFT directory: (spec,
PEFT-keyed tensors, sub-adapters), so the rest of the package sees one shape of checkpoint. A
single-file format names modules relative to one model of a pipeline, so reading needs that model:
the file's part that fits it is chosen (or named with `component=`), every module name resolved and
every shape checked against it before anything is created. Saving refuses by name what a format
cannot hold and writes atomically (a temporary file renamed into place).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import checkpoint
from ..errors import AdapterError, CheckpointError
from . import diffusers, kohya
from ._foreign import DENOISERS, describe_groups, read_safetensors

FORMATS = ("peft", "kohya", "diffusers")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


def detect(path) -> tuple[str, Path]:
    """(format, the directory or file holding it) of an adapter path; raises for anything else."""
    p = Path(path)
    if p.is_dir():
        if (p / checkpoint.CONFIG_NAME).is_file():
            return "peft", p
        if (p / diffusers.WEIGHT_NAME).is_file():
            return "diffusers", p / diffusers.WEIGHT_NAME
        raise CheckpointError(
            f"{p}: neither a PEFT adapter directory ({checkpoint.CONFIG_NAME}) nor a diffusers LoRA directory "
            f"({diffusers.WEIGHT_NAME}); for a kohya/LyCORIS file pass the .safetensors file itself."
        )
    if not p.exists():
        raise CheckpointError(f"{p}: no such path (not a directory, not a file); pass a PEFT adapter directory or a "
                              f"kohya/LyCORIS or diffusers .safetensors file.")
    if p.suffix in _PICKLES:
        raise CheckpointError(f"{p}: a pickle ({p.suffix}); only .safetensors adapter files are read (a pickle can "
                              f"run code). Convert it with a trusted tool first.")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: not a .safetensors file; pass a PEFT directory or a kohya/LyCORIS/diffusers "
                              f".safetensors file.")
    return _classify(p, read_safetensors(p)[0]), p


def _classify(path: Path, tensors: dict) -> str:
    """The one format every key of a single file belongs to."""
    owners = {"kohya": [k for k in tensors if kohya.owns(k)], "diffusers": [k for k in tensors if diffusers.owns(k)],
              "peft": [k for k in tensors if k.startswith(checkpoint.PREFIX)]}
    claimed = {k for keys in owners.values() for k in keys}
    unknown = [k for k in tensors if k not in claimed]
    present = {f: keys for f, keys in owners.items() if keys}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors.")
    if len(present) > 1 or (present and unknown):
        shown = "; ".join(f"{f} ({len(keys)} keys, e.g. {keys[0]})" for f, keys in present.items())
        if unknown:
            shown += f"; unknown ({len(unknown)} keys, e.g. {unknown[0]})"
        raise CheckpointError(
            f"{path}: mixes formats: {shown}. One file holds one format; split it, or re-save it with one tool."
        )
    if not present:
        raise CheckpointError(
            f"{path}: not an adapter format adapt_compiler reads (keys such as {', '.join(unknown[:3])}); expected "
            f"kohya/LyCORIS (lora_unet_…, lora_te1_…) or diffusers (unet.…, transformer.…, text_encoder.…) keys."
        )
    (found,) = present
    if found == "peft":
        raise CheckpointError(f"{path}: a PEFT {checkpoint.WEIGHTS_NAME} without its config; pass the directory "
                              f"holding it and {checkpoint.CONFIG_NAME}.")
    return found


def read_adapter(path, model: nn.Module | None = None, component: str | None = None):
    """(spec, PEFT-keyed tensors, sub-adapters) of any adapter path, read and validated against `model`."""
    fmt, where = detect(path)
    if fmt == "peft":
        if component is not None:
            raise AdapterError(f"{path}: component={component!r} selects a part of a single-file checkpoint; a PEFT "
                               f"directory holds one model's adapter. Drop component=.")
        return checkpoint.read_adapter(where)
    if model is None:
        raise AdapterError(f"{path}: a {fmt} file names modules of a model; it is read with that model.")
    tensors, metadata = read_safetensors(where)
    if fmt == "kohya":
        spec, peft_tensors, _ = kohya.read(tensors, model, component, str(where))
    else:
        spec, peft_tensors, _ = diffusers.read(tensors, metadata, model, component, str(where))
    return spec, peft_tensors, {}


# -- saving ------------------------------------------------------------------------------------------
def default_component(model: nn.Module) -> str | None:
    """diffusers' pipeline attribute for a model: a diffusers UNet -> "unet", a diffusers transformer ->
    "transformer", a transformers model (a text encoder in a pipeline) -> "text_encoder"."""
    cls = type(model)
    if cls.__module__.startswith("diffusers."):
        return "unet" if "UNet" in cls.__name__ else "transformer" if "Transformer" in cls.__name__ else None
    if cls.__module__.startswith("transformers."):
        return "text_encoder"
    return None


def save_adapter(table, path, adapter_name: str | None = None, format: str = "peft", component: str | None = None,
                 extra_files=None):
    """Save in `format`: "peft" (a directory, every adapter), "kohya" or "diffusers" (one adapter, one file).
    `extra_files` (PEFT directories only): see checkpoint.save_adapter."""
    if format not in FORMATS:
        raise AdapterError(f"save_adapter: format={format!r} is not one of {FORMATS}.")
    if format == "peft":
        if component is not None:
            raise AdapterError("save_adapter: component= names a model of a pipeline in a single-file format; the "
                               "PEFT format has no such field. Drop component= or pick format='kohya'/'diffusers'.")
        return checkpoint.save_adapter(table, path, adapter_name, extra_files=extra_files)
    if extra_files is not None:
        raise AdapterError(f"save_adapter(format={format!r}, compile_cache=True): a compile cache is saved next to "
                           f"the adapter in a PEFT directory; a {format} file has no room for it. Save with "
                           f"format='peft', or drop compile_cache=True.")
    names = [adapter_name] if adapter_name else list(table.specs)
    if len(names) > 1:
        raise AdapterError(f"save_adapter(format={format!r}): a {format} file holds one adapter and this module has "
                           f"{names}; pass adapter_name=.")
    (name,) = names
    if name not in table.specs:
        raise AdapterError(f"save_adapter: no adapter named {name!r}; known: {list(table.specs)}.")
    component = component or default_component(table.model)
    if component is None:
        raise AdapterError(f"save_adapter(format={format!r}): which model of a pipeline is "
                           f"{type(table.model).__name__}? Pass component= (e.g. 'unet', 'transformer', "
                           f"'text_encoder').")
    (kohya if format == "kohya" else diffusers).save(table, name, path, component)


# -- inspecting a file -------------------------------------------------------------------------------
def describe(path) -> list[str]:
    """Lines saying what an adapter file holds without a model: format, parts, methods, ranks and alphas."""
    fmt, where = detect(path)
    if fmt == "peft":
        config = checkpoint.read_config(where)
        return [f"format: peft ({where})", f"method: {config['peft_type']}, r={config.get('r')}, "
                f"targets: {config.get('target_modules')}"]
    tensors, metadata = read_safetensors(where)
    parts = kohya.groups(tensors, str(where)) if fmt == "kohya" else diffusers.groups(tensors, metadata, str(where))
    lines = [f"format: {fmt} ({where}); parts: {describe_groups(parts)}"]
    for g in parts:
        methods = sorted({mw.method for mw in g.modules.values()})
        ranks = sorted({_rank(mw) for mw in g.modules.values()})
        alphas = sorted({mw.alpha for mw in g.modules.values() if mw.alpha is not None})
        names = sorted(g.modules)
        shown = ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else "")
        what = f"{g.prefix} -> {g.component}" + (" (denoiser)" if g.component in DENOISERS else "")
        lines.append(f"  {what}: method {'/'.join(methods)}, ranks {ranks}, alphas {alphas or 'none (scale 1)'}"
                     + (", with adapter metadata" if g.metadata else "") + f"; modules: {shown}")
    return lines


def _rank(mw) -> int:
    t = mw.tensors
    for key, dim in (("lora_A", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
        if key in t:
            return int(t[key].shape[dim])
    return 0  # LoKr with both factors full: no rank
