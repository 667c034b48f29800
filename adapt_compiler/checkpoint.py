"""PEFT-format adapter checkpoints: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<module path>.<param>` (e.g. `...q_proj.lora_A.weight`), so a
directory written by `PeftModel.save_pretrained` loads here and ours loads into PEFT. Everything is
validated (method, keys, shapes, finite values) before any tensor is touched; writes go to temporary
files that are renamed into place, so an interrupted save leaves the previous checkpoint intact.

Also here: hotswap (new weights into a compiled adapter, no recompile) and a graph method's
sub-adapters (X-LoRA's experts, each a PEFT LoRA folder next to the root config). Every function
takes the AdapterTable (table.py), never the AdaptedModule.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import AdapterError, CheckpointError
from .names import PEFT_PREFIX as PREFIX
from .passes import GraphMethod, method_for, method_for_peft_type
from .default_targets import peft_default
from .passes.lora import RESIDUAL_DATA_INITS
from .passes.match import describe_layer, layer_kind
from .spec import resolve_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# spec fields that say where an adapter sits, not what it computes (hotswap may change them)
_TARGETING = {"targets", "exclude", "modules_to_save", "layers_to_transform", "order"}


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


def read_sub_adapters(method, spec) -> dict:
    """A graph method's sub-adapters (X-LoRA's experts): name -> (spec, PEFT-keyed tensors or None,
    where they came from). Directories are read and validated here, before anything is created."""
    out = {}
    for name, source in method.sub_adapters(spec).items():
        if isinstance(source, (str, Path)):
            config = read_config(source)
            sub_spec = spec_from_config(config, str(Path(source) / CONFIG_NAME))
            out[name] = (sub_spec, read_tensors(source), str(source))
        else:
            out[name] = (source, None, "spec")
    return out


def read_adapter(path):
    """(spec, tensors, sub-adapters) of a PEFT adapter directory, all read and validated."""
    config = read_config(path)
    tensors = read_tensors(path)
    spec = fit_spec_to_tensors(spec_from_config(config, str(Path(path) / CONFIG_NAME)), tensors)
    method = method_for(spec)
    sub = read_sub_adapters(method, spec) if isinstance(method, GraphMethod) else {}
    return spec, tensors, sub


# -- the base's quantization ---------------------------------------------------------------------
# Adapters are quantization-agnostic (the same tensors load over any base), but outputs move by the
# quantization error, so the safetensors metadata records what the adapter was trained over (PEFT
# ignores it) and a load over a differently quantized base warns, naming both.
QUANT_METADATA = "adapt_compiler.base_quantization"
UNQUANTIZED = "unquantized"


def base_quantization(table, name: str) -> str:
    """How the layers adapter `name` sits on are quantized: "bitsandbytes nf4 (double quant)", ...,
    "unquantized", or several joined by " + "."""
    schemes = sorted({s.layer.quant.scheme if s.layer.quant is not None else UNQUANTIZED
                      for s in table.slots_of(name)})
    return " + ".join(schemes) if schemes else UNQUANTIZED


def read_quantization(path) -> str | None:
    """The base quantization an adapter directory was saved with (None: not recorded, e.g. by PEFT)."""
    st = Path(path) / WEIGHTS_NAME
    if not st.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(st), framework="pt") as f:
            return (f.metadata() or {}).get(QUANT_METADATA)
    except Exception:  # noqa: BLE001 - unreadable metadata: the tensor load reports the file itself
        return None


def warn_if_quantization_differs(table, name: str, path) -> None:
    """Warn, naming both, when adapter `name` was loaded from a checkpoint trained over another
    quantization of the base than this model's."""
    trained = read_quantization(path)
    here = base_quantization(table, name)
    if trained is not None and trained != here:
        warnings.warn(
            f"{path}: adapter {name!r} was trained over a base quantized as {trained}; this base is {here}. "
            f"It loads (adapters do not depend on the quantization), but outputs differ from the training run's "
            f"by the difference between the two quantizations.",
            QuantizationMismatchWarning,
            stacklevel=3,
        )


class QuantizationMismatchWarning(UserWarning):
    """An adapter checkpoint was trained over a differently quantized base (see base_quantization)."""


# -- state dicts ------------------------------------------------------------------------------
def adapter_state_dict(table, name: str, live: bool = False) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter `name`; `live=True`: the tensors themselves, in-memory shapes
    (before `saved_tensors`), which loads copy into."""
    if name not in table.specs and table.pool is not None and name in table.pool:
        return _pool_state_dict(table, name)
    if name not in table.specs:
        raise AdapterError(f"no adapter named {name!r}; known: {table.names()}.")
    spec = table.specs[name]
    method = method_for(spec)
    out: dict[str, torch.Tensor] = {}
    if isinstance(method, GraphMethod):
        out.update({method.key_prefix + k: v for k, v in method.state_dict(table, name).items()})
    elif name in table.shared:
        for pname, t in table.shared[name].as_dict().items():
            key = method.shared_peft_key(pname)
            if key is not None:
                out[key] = t
    for slot in table.slots_of(name):
        params = slot.adapters[name].as_dict()
        if not live:
            params = slot.methods[name].saved_tensors(spec, slot.layer, params)
        for pname, t in params.items():
            key = slot.methods[name].peft_key(pname, slot.layer)
            if key is not None:
                out[f"{PREFIX}{slot.layer.key_path}.{key}"] = t
    for saved in table.saved.values():
        if name in saved.copies:
            for k, t in saved.copies[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{saved.fqn}.{k}"] = t
    if live:
        return out
    return {k: v.detach().contiguous() for k, v in out.items()}


def check_tensors(expected: dict, given: dict, where: str, what: str, padded: bool = False) -> None:
    """Raise a CheckpointError listing missing / unexpected keys, shape mismatches and non-finite
    values of `given` against `expected` (key -> tensor). `padded`: a smaller shape fits (hotswap)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    bad_shape = []
    for k in sorted(set(expected) & set(given)):
        want, got = tuple(expected[k].shape), tuple(given[k].shape)
        if want != got and not (padded and _fits_padded(want, got)):
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
            f"{where} does not fit {what} on this model: " + " | ".join(lines)
            + ". Fix: use the checkpoint made for this base model and config (targets, r, method)."
        )
    nonfinite = [k for k, v in given.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{where}: refused: NaN/Inf values in {', '.join(nonfinite[:5])}.")


@torch.no_grad()
def copy_tensors(expected: dict, given: dict) -> None:
    """Copy each given tensor into the live tensor of the same key (a smaller one zero-padded)."""
    for k, t in expected.items():
        src = given[k].to(t.dtype)
        if src.shape != t.shape:  # hotswap of a smaller rank: zero-pad
            padded = torch.zeros_like(t)
            padded[tuple(slice(0, s) for s in src.shape)] = src
            src = padded
        t.copy_(src)


def _normalise_keys(table, name: str, state_dict: dict) -> dict:
    return _normalise_for(method_for(table.specs[name]), name, state_dict)


def _normalise_for(method, name: str, state_dict: dict) -> dict:
    own = getattr(method, "key_prefix", PREFIX)  # a graph method's keys may sit outside base_model.model.
    given = {(k if k.startswith(("base_model.", own)) else PREFIX + k): v for k, v in state_dict.items()}
    given = {_strip_adapter_name(k, name): v for k, v in given.items()}
    if not isinstance(method, GraphMethod):
        given = {method.checkpoint_key(k): v for k, v in given.items()}  # e.g. legacy Bone keys
    # PEFT also saves the base embedding when it targets one (save_embedding_layers); the base is ours
    return {k: v for k, v in given.items() if not is_saved_base_layer(k)}


def is_saved_base_layer(key: str) -> bool:
    """PEFT's copy of a targeted embedding's own weight (`<module>.base_layer.weight`), which we never load;
    not the adapter keys PEFT nests under `base_layer.` (MHA's out_proj, several targeted parameters)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == "base_layer"


def load_adapter_state_dict(table, state_dict: dict, name: str, where: str = "state dict", hotswap=False) -> None:
    """Copy PEFT-keyed tensors into adapter `name`; validate everything first."""
    expected = adapter_state_dict(table, name, live=True)
    given = _normalise_keys(table, name, state_dict)
    check_tensors(expected, given, where, f"adapter {name!r}", padded=hotswap)
    copy_tensors(expected, given)
    if table.data_init.get(name) in RESIDUAL_DATA_INITS:  # trained factors: only the residual base is to come
        table.data_init[name] += "-residual"


def load_sub_adapters(table, method, name: str, sub_adapters: dict) -> None:
    """Copy each sub-adapter's checkpoint tensors (read by `read_sub_adapters`) into the modules
    the graph method created for it; validated first, all of them before any copy."""
    live = method.sub_adapter_state(table, name)
    plans = []
    for sub, (_, tensors, where) in sub_adapters.items():
        if tensors is None:
            continue
        expected = live[sub][2]
        given = {_strip_adapter_name(k, sub): v for k, v in tensors.items()}
        check_tensors(expected, given, where, f"{method.name} sub-adapter {sub!r}")
        plans.append((expected, given))
    for expected, given in plans:
        copy_tensors(expected, given)


def _fits_padded(want, got) -> bool:
    return len(want) == len(got) and all(g <= w for g, w in zip(got, want))


def _strip_adapter_name(key: str, name: str) -> str:
    """State dicts taken from a live PeftModel carry `.<adapter>` after the param name; drop it."""
    return key.replace(f".{name}.weight", ".weight").removesuffix(f".{name}")


def live_tensor(table, name: str, key: str) -> torch.Tensor:
    """The live tensor behind one PEFT key of adapter `name` (tests read its .grad)."""
    return adapter_state_dict(table, name, live=True)[key]


# -- the serving pool (lowering/pool.py) ---------------------------------------------------------
def low_rank_operands(table, name: str, spec, tensors: dict | None = None, where: str = "spec") -> dict:
    """fqn -> (A, B, s) of an adapter on each layer it targets, as its method's `kernel_operands` gives
    them (None on a layer where it is not plain low-rank), without adding it to the table: from a
    PEFT state dict, checked like any load (keys, shapes, finite values), or from the method's init."""
    method = method_for(spec)
    if isinstance(method, GraphMethod):
        return {"(graph)": None}
    modules = dict(table.model.named_modules())
    params = {}
    for fqn in resolve_targets(spec, table.model, layer_kind):
        layer = describe_layer(fqn, modules[fqn])
        method.check(spec, layer)
        weight = table.frozen[fqn + ".weight"]
        tensors_ = method.init_params(spec, layer, weight.t() if layer.transposed else weight)
        params[fqn] = (layer, {k: v.to(weight.device) for k, v in tensors_.items()})
    if tensors is not None:
        expected = {f"{PREFIX}{fqn}.{method.peft_key(p, layer)}": t for fqn, (layer, ps) in params.items()
                    for p, t in ps.items() if method.peft_key(p, layer) is not None}
        given = _normalise_for(method, name, tensors)
        check_tensors(expected, given, where, f"adapter {name!r}")
        copy_tensors(expected, given)
    return {fqn: method.kernel_operands(spec, layer, ps, False) for fqn, (layer, ps) in params.items()}


def _pool_state_dict(table, name: str) -> dict[str, torch.Tensor]:
    pool = table.pool
    method = method_for(pool.specs[name])
    return {f"{PREFIX}{fqn}.{method.peft_key(p, pool.layers[fqn])}": t.detach().contiguous()
            for fqn, ps in pool.tensors_of(name).items() for p, t in ps.items()}


# -- hotswap -----------------------------------------------------------------------------------
def _changed(old, new) -> set[str]:
    if type(old) is not type(new):
        return {"method"}
    return {f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)}


def check_hotswap(table, name: str, new_spec, merged: bool) -> None:
    """Raise before anything is copied if `new_spec` cannot replace adapter `name` in place.

    Compiled graphs bake the adapter's spec in as Python constants (LoRA's scaling is a float in
    the graph; Dynamo guards on the spec's fields), so the compiled spec stays: only fields the
    method can fold into its tensors (`hotswap_foldable`) or targeting fields may differ."""
    if name not in table.specs:
        raise AdapterError(f"hotswap: no adapter named {name!r} to replace; known: {list(table.specs)}.")
    old = table.specs[name]
    if merged and name in table.active:
        raise AdapterError(f"hotswap: adapter {name!r} is merged into the weights; unmerge() first.")
    changed = _changed(old, new_spec) - _TARGETING
    if "method" in changed:
        raise AdapterError(
            f"hotswap: adapter {name!r} is {type(old).__name__}, the checkpoint is {type(new_spec).__name__}; "
            f"hotswap needs the same method (use load_adapter without hotswap to add it as a new adapter)."
        )
    fixed = changed - set(getattr(method_for(old), "hotswap_foldable", ()))
    if fixed:
        raise AdapterError(
            f"hotswap: adapter {name!r} differs from the checkpoint in {sorted(fixed)}, which the compiled graph "
            f"bakes in; load it without hotswap (a recompile), or save it with the same settings."
        )


def hotswap(table, name: str, new_spec, tensors: dict, where: str, merged: bool) -> None:
    """Replace adapter `name`'s weights in place (same tensor objects: nothing recompiles); a smaller
    rank is zero-padded to the compiled one; the method then folds what its spec changed."""
    check_hotswap(table, name, new_spec, merged)  # before any tensor is touched
    load_adapter_state_dict(table, tensors, name, where=where, hotswap=True)
    old = table.specs[name]
    method = method_for(old)
    for slot in table.slots_of(name):
        method.fold_hotswap(old, new_spec, slot.layer, slot.adapters[name].as_dict())


def overwrite(table, name: str, spec, tensors: dict, sub: dict, where: str, merged: bool) -> None:
    """Load a checkpoint into the existing adapter `name`, in place: the same tensor objects, so an
    optimizer built on them and every compiled graph stay valid (PeftModel.load_adapter with an
    existing name; transformers.Trainer resumes adapters this way). The checkpoint must be of the
    same adapter config; everything is validated before any tensor is copied."""
    if merged and name in table.active:
        raise AdapterError(f"load_adapter: adapter {name!r} is merged into the weights; unmerge() first.")
    changed = sorted(_changed(table.specs[name], spec) - _TARGETING)
    if changed:
        raise AdapterError(
            f"load_adapter: {where} holds a different config than adapter {name!r} ({', '.join(changed)} differ); "
            f"load it under a new adapter_name, or with hotswap=True to replace its weights in the compiled shape."
        )
    expected = adapter_state_dict(table, name, live=True)
    given = _normalise_keys(table, name, tensors)
    check_tensors(expected, given, where, f"adapter {name!r}")
    method = method_for(table.specs[name])
    if isinstance(method, GraphMethod) and sub:
        load_sub_adapters(table, method, name, sub)  # validates all of them before copying any
    copy_tensors(expected, given)


# -- writing ----------------------------------------------------------------------------------
def peft_config(table, name: str, spec=None) -> dict:
    spec = spec if spec is not None else table.spec_of(name)
    method = method_for(spec)
    config = dict(method.to_peft_config(spec))
    model_config = table.model_config()
    targets = spec.targets
    if targets is None:
        targets = peft_default(spec.method, getattr(model_config, "model_type", None))
    config.setdefault("target_modules", targets if isinstance(targets, str) or targets is None else list(targets))
    config.setdefault("exclude_modules", spec.exclude)
    config.setdefault("modules_to_save", spec.modules_to_save)
    config.setdefault("layers_to_transform", spec.layers_to_transform)
    config.update(
        peft_type=method.peft_type,
        task_type=None,
        inference_mode=True,
        base_model_name_or_path=getattr(model_config, "_name_or_path", None) or None,
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


def _payloads(table, root: Path, names: list[str], layout: str, convert=None) -> list[tuple[Path, dict, dict, dict]]:
    """(directory, tensors, config, safetensors metadata) of every folder a save writes: each adapter
    (layout "first": the first in `root`, others in `root/<name>/`; layout "peft": PeftModel.save_pretrained's,
    the adapter named "default" in `root`, every other in `root/<name>/`) and each graph method's
    sub-adapters in `<its dir>/<sub>/`."""
    out = []
    for i, n in enumerate(names):
        at_root = n == "default" if layout == "peft" else i == 0
        target = root if at_root else root / n
        config = peft_config(table, n)
        metadata = {"format": "pt", QUANT_METADATA: base_quantization(table, n)}
        method = method_for(table.spec_of(n))
        subs = method.sub_adapter_state(table, n) if isinstance(method, GraphMethod) else {}
        if subs:
            # PEFT opens `adapters` values as given (relative = to its cwd), so record the folders'
            # absolute paths; loading falls back to <root>/<name> when the checkpoint has been moved
            config["adapters"] = {sub: str((target / sub).resolve()) for sub in subs}
        tensors = adapter_state_dict(table, n)
        if n in (convert or {}):  # PEFT's path_initial_model_for_weight_conversion
            tensors, config = converted_to_lora(tensors, config, Path(convert[n]))
        out.append((target, tensors, config, metadata))
        for sub, (sub_spec, fqns, tensors) in subs.items():
            sub_config = peft_config(table, n, sub_spec.replace(targets=sub_spec.targets or list(fqns)))
            out.append((target / sub, {k: v.detach().contiguous() for k, v in tensors.items()}, sub_config,
                        metadata))
    return out


def save_adapter(table, path, adapter_name: str | list[str] | None = None, layout: str = "first",
                 extra_files=None, convert: dict | None = None) -> None:
    """PEFT's files: the first (or named) adapter in `path`, any others in `path/<name>/`
    (`layout="peft"`: the one named "default" in `path`, see _payloads). `extra_files`: {file name:
    bytes} more for `path` (the compile cache, compile_cache.py), staged with the adapter files and
    renamed after them, in the dict's order. `convert`: {adapter name: the directory its initial adapter was
    saved in}, written as plain LoRA (`converted_to_lora`)."""
    if adapter_name is None:
        names = table.names()
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        if n not in table.names():
            raise AdapterError(f"save_adapter: no adapter named {n!r}; known: {table.names()}.")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: exists and is not a directory; choose a directory path.")
    payloads = _payloads(table, root, names, layout, convert)
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
        for target, tensors, config, metadata in payloads:
            text = json.dumps(config, indent=2, default=str)
            staged.append((_write_temp(target / WEIGHTS_NAME,
                                       lambda tmp: save_file(tensors, tmp, metadata=metadata)),
                           target / WEIGHTS_NAME))
            staged.append((_write_temp(target / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)),
                           target / CONFIG_NAME))
        for file_name, data in (extra_files or {}).items():
            staged.append((_write_temp(root / file_name, lambda tmp: Path(tmp).write_bytes(data)), root / file_name))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def converted_to_lora(tensors: dict, config: dict, initial: Path) -> tuple[dict, dict]:
    """PEFT's `path_initial_model_for_weight_conversion` (LoraModel.subtract_mutated_init): an adapter whose
    init changed the base (PiSSA, OLoRA, CorDA: W = W_res + s·B0·A0) becomes plain LoRA over the original W.
    With A, B trained, W_res + s·B·A = W + s·(B·A − B0·A0) = W + s·[B | −B0]·[A ; A0], a LoRA of rank 2r with
    the same scaling (alpha doubled; √2 with rsLoRA). `initial`: the directory the adapter was saved in right
    after its init. As PEFT does, that directory's config is rewritten with init_lora_weights=True."""
    from safetensors.torch import load_file

    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise AdapterError("save: path_initial_model_for_weight_conversion is not supported with use_rslora and a "
                           "rank_pattern / alpha_pattern (PEFT raises too).")
    other = sorted(k for k in tensors if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")))
    if other:
        raise AdapterError(f"save: path_initial_model_for_weight_conversion converts plain LoRA factors; this adapter "
                           f"also has {other[0]} (PEFT would drop it silently); save without the conversion.")
    file = initial / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"{initial}: no {WEIGHTS_NAME}; path_initial_model_for_weight_conversion must be the "
                              f"directory the adapter was saved in right after its initialisation.")
    start = load_file(str(file))
    check_tensors(tensors, start, str(initial), "the initial adapter")
    out = {}
    for k, t in tensors.items():
        a_side = k.endswith(".lora_A.weight")
        out[k] = torch.cat([t, start[k].to(t)], 0) if a_side else torch.cat([t, -start[k].to(t)], 1)
    init_config = {**config, "init_lora_weights": True}
    write_text_atomic(initial / CONFIG_NAME, json.dumps(init_config, indent=2, default=str))
    rank_pattern = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    alpha_pattern = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
    alpha = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    return out, {**config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": alpha,
                 "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and a rename (never half-written)."""
    os.replace(_write_temp(Path(path), lambda tmp: Path(tmp).write_text(text)), path)
