"""PEFT-format adapter checkpoints: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<module path>.<param>` (e.g. `...q_proj.lora_A.weight`), so a
directory written by `PeftModel.save_pretrained` loads here and ours loads into PEFT. Everything is
validated (method, keys, shapes, finite values) before any tensor is touched; writes go to temporary
files that are renamed into place, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .passes import method_for, method_for_peft_type
from .passes.method import AdapterError, GraphMethod

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class CheckpointError(AdapterError):
    """A checkpoint that cannot be read or does not fit the model."""


# -- reading -----------------------------------------------------------------------------------
def read_config(path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a PEFT adapter directory (with {CONFIG_NAME}).")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}; is this a PEFT adapter directory?")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err}); re-save the adapter.") from err
    if "peft_type" not in config:
        raise CheckpointError(f"{cfg_file}: no 'peft_type' field; is this a PEFT adapter config?")
    config["_ac_dir"] = str(path)  # paths inside a config (X-LoRA's experts) are relative to it
    return config


def read_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    st, legacy = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{st}: truncated or corrupt safetensors file ({err}); re-save the adapter.") from err
    if legacy.is_file():
        try:
            return torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickles with code are refused, never executed
            raise CheckpointError(
                f"{legacy}: refused: it is not loadable with weights_only=True (a pickle with code, or corrupt). "
                f"Convert it to safetensors with a trusted tool first."
            ) from err
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} found.")


def spec_from_config(config: dict, where: str = CONFIG_NAME):
    method = method_for_peft_type(config["peft_type"], where)
    spec = method.from_peft_config(config)
    common = {}
    if "target_modules" in config and config["target_modules"] is not None:
        t = config["target_modules"]
        common["targets"] = t if isinstance(t, str) else list(t)
    if config.get("exclude_modules"):
        e = config["exclude_modules"]
        common["exclude"] = e if isinstance(e, str) else list(e)
    if config.get("modules_to_save"):
        common["modules_to_save"] = list(config["modules_to_save"])
    if config.get("layers_to_transform") is not None:
        common["layers_to_transform"] = config["layers_to_transform"]
    valid = {f for f in spec.__dataclass_fields__}
    return spec.replace(**{k: v for k, v in common.items() if k in valid})


def spec_from_dir(path):
    spec = spec_from_config(read_config(path), str(Path(path) / CONFIG_NAME))
    return fit_spec_to_tensors(spec, read_tensors(path))


def fit_spec_to_tensors(spec, tensors: dict):
    """Where a checkpoint's config and its tensors disagree (PEFT's CPU BOFT saves N=1 tensors under
    N>1; PEFT's OFT saves the requested block size after moving it), the tensors' shapes win."""
    fit = getattr(method_for(spec), "spec_from_tensors", None)  # graph methods have none
    return fit(spec, tensors) if fit else spec


# -- state dicts ------------------------------------------------------------------------------
def adapter_state_dict(module, name: str, live: bool = False) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter `name`; `live=True`: the in-memory shapes (before `saved_tensors`)."""
    if name not in module.state.specs:
        raise AdapterError(f"no adapter named {name!r}; known: {list(module.state.specs)}.")
    spec = module.state.specs[name]
    method = method_for(spec)
    out: dict[str, torch.Tensor] = {}
    if isinstance(method, GraphMethod):
        out.update({method.key_prefix + k: v for k, v in method.state_dict(module, name).items()})
    for slot in module.slots_of(name):
        params = slot.params(name)
        if not live:
            params = slot.methods[name].saved_tensors(spec, slot.layer, params)
        for pname, t in params.items():
            key = slot.methods[name].peft_key(pname, slot.layer)
            if key is not None:
                out[f"{PREFIX}{slot.layer.fqn}.{key}"] = t
    for saved in module.saved.values():
        if name in saved.copies:
            for k, t in saved.copies[name].state_dict().items():
                out[f"{PREFIX}{saved.fqn}.{k}"] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


def _expected(module, name: str) -> dict[str, torch.Tensor]:
    return adapter_state_dict(module, name, live=True)  # loads copy into the live tensors


def load_adapter_state_dict(module, state_dict: dict, name: str, where: str = "state dict", hotswap=False) -> None:
    """Copy PEFT-keyed tensors into adapter `name`; validate everything first."""
    expected = _expected(module, name)
    method = method_for(module.state.specs[name])
    own = getattr(method, "key_prefix", PREFIX)  # a graph method's keys may sit outside base_model.model.
    given = {(k if k.startswith(PREFIX) or k.startswith(own) else PREFIX + k): v for k, v in state_dict.items()}
    given = {_strip_adapter_name(k, name): v for k, v in given.items()}
    if not isinstance(method, GraphMethod):
        given = {method.checkpoint_key(k): v for k, v in given.items()}  # e.g. legacy Bone keys
    # PEFT also saves the base embedding when it targets one (save_embedding_layers); the base is ours
    given = {k: v for k, v in given.items() if ".base_layer." not in k}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    bad_shape = []
    for k in set(expected) & set(given):
        want, got = tuple(expected[k].shape), tuple(given[k].shape)
        if want != got and not (hotswap and _fits_padded(want, got)):
            bad_shape.append(f"{k}: checkpoint {got} vs model {want}")
    if missing or unexpected or bad_shape:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if bad_shape:
            lines.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape[:5])}")
        raise CheckpointError(
            f"{where} does not fit adapter {name!r} on this model: " + " | ".join(lines)
            + ". Fix: use the checkpoint made for this base model and config (targets, r, method)."
        )
    nonfinite = [k for k, v in given.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{where}: refused: NaN/Inf values in {', '.join(nonfinite[:5])}.")
    method = method_for(module.state.specs[name])
    if isinstance(method, GraphMethod):
        method.load_state_dict(module, name, {k[len(own):]: v for k, v in given.items() if k.startswith(own)})
    with torch.no_grad():
        for k, t in expected.items():
            src = given[k].to(t.dtype)
            if src.shape != t.shape:  # hotswap of a smaller rank: zero-pad
                padded = torch.zeros_like(t)
                padded[tuple(slice(0, s) for s in src.shape)] = src
                src = padded
            _target_tensor(module, name, k).copy_(src)


def _fits_padded(want, got) -> bool:
    return len(want) == len(got) and all(g <= w for g, w in zip(got, want))


def _strip_adapter_name(key: str, name: str) -> str:
    """State dicts taken from a live PeftModel carry `.<adapter>` after the param name; drop it."""
    return key.replace(f".{name}.weight", ".weight").removesuffix(f".{name}")


def _target_tensor(module, name: str, key: str) -> torch.Tensor:
    rest = key[len(PREFIX):]
    for slot in module.slots_of(name):
        prefix = slot.layer.fqn + "."
        if rest.startswith(prefix):
            for pname, t in slot.params(name).items():
                if slot.methods[name].peft_key(pname, slot.layer) == rest[len(prefix):]:
                    return t
    for saved in module.saved.values():
        if name in saved.copies and rest.startswith(saved.fqn + "."):
            return saved.copies[name].state_dict(keep_vars=True)[rest[len(saved.fqn) + 1:]]
    method = method_for(module.state.specs[name])
    if isinstance(method, GraphMethod) and key.startswith(method.key_prefix):
        return method.state_dict(module, name)[key[len(method.key_prefix):]]
    raise KeyError(key)


# -- writing ----------------------------------------------------------------------------------
def peft_config(module, name: str) -> dict:
    spec = module.state.specs[name]
    method = method_for(spec)
    config = dict(method.to_peft_config(spec))
    targets = spec.targets
    if targets is None:
        from .spec import DEFAULT_TARGETS

        targets = DEFAULT_TARGETS.get(getattr(getattr(module._model, "config", None), "model_type", None))
    config.setdefault("target_modules", targets if isinstance(targets, str) or targets is None else list(targets))
    config.setdefault("exclude_modules", spec.exclude)
    config.setdefault("modules_to_save", spec.modules_to_save)
    config.setdefault("layers_to_transform", spec.layers_to_transform)
    config.update(
        peft_type=method.peft_type,
        task_type=None,
        inference_mode=True,
        base_model_name_or_path=getattr(getattr(module._model, "config", None), "_name_or_path", None) or None,
        revision=None,
    )
    return config


def _write_temp(path: Path, write) -> str:
    """Write via `write(tmp)` to a temporary file next to `path` (fsynced); return its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(module, path, adapter_name: str | None = None) -> None:
    """PEFT layout: the first (or named) adapter in `path`, any others in `path/<name>/`."""
    names = [adapter_name] if adapter_name else list(module.state.specs)
    for n in names:
        if n not in module.state.specs:
            raise AdapterError(f"save_adapter: no adapter named {n!r}; known: {list(module.state.specs)}.")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: exists and is not a directory; choose a directory path.")
    payloads = [(root if i == 0 else root / n, n, adapter_state_dict(module, n), peft_config(module, n))
                for i, n in enumerate(names)]
    for target, *_ in payloads:  # fail before writing anything
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"{target}: cannot create the directory ({err}); choose a writable path.") from err
        if not os.access(target, os.W_OK):
            raise CheckpointError(f"{target}: not writable; choose a writable path.")
    from safetensors.torch import save_file

    # every file is staged first and renamed only once all are written: an interrupted save
    # (an error or Ctrl-C while writing) leaves the previous weights *and* config in place
    staged: list[tuple[str, Path]] = []
    try:
        for target, n, tensors, config in payloads:
            text = json.dumps(config, indent=2, default=str)
            staged.append((_write_temp(target / WEIGHTS_NAME,
                                       lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
                           target / WEIGHTS_NAME))
            staged.append((_write_temp(target / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)),
                           target / CONFIG_NAME))
        for tmp, final in staged:
            os.replace(tmp, final)
        for target, n, _, _ in payloads:  # a graph method's extra files (X-LoRA's expert folders)
            method = method_for(module.state.specs[n])
            if isinstance(method, GraphMethod):
                method.save_files(module, n, target)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def load_adapter(module, path, name: str, hotswap: bool = False) -> None:
    config = read_config(path)
    tensors = read_tensors(path)
    spec = fit_spec_to_tensors(spec_from_config(config, str(Path(path) / CONFIG_NAME)), tensors)
    if hotswap:
        if name not in module.state.specs:
            raise AdapterError(f"hotswap: no adapter named {name!r} to replace; known: {list(module.state.specs)}.")
        from .lowering.hotswap import check_hotswap, rescale_after_hotswap

        check_hotswap(module, name, spec)  # before any tensor is touched
        load_adapter_state_dict(module, tensors, name, where=str(path), hotswap=True)

        rescale_after_hotswap(module, name, spec)
        return
    module.add_adapter(name, spec)
    try:
        load_adapter_state_dict(module, tensors, name, where=str(path))
    except Exception:
        module.delete_adapter(name)
        raise
