"""The PeftModel surface: PEFT's spellings, with PeftModel's meaning, over our canonical API.

Trainer, TRL and accelerate treat a model as a PEFT model when `isinstance(model, PeftModel)`
(integrations/adapted_class.py makes that true when peft is installed) and then call PeftModel's
methods on it. The README's "Coming from PEFT" table has one canonical spelling per concept; the
PEFT spellings here are aliases of it:

    PEFT                                   canonical                    used by
    save_pretrained(dir, ...)              save_adapter(dir)            Trainer.save_model, every checkpoint
    load_adapter(dir, name, is_trainable)  load_adapter (module.py)     Trainer resume / load_best_model_at_end
    get_base_model()                       (the adapted model view)     Trainer introspection, TRL fused LM head
    base_model (.model)                    (the tuner view)             Trainer label smoothing
    peft_config, active_adapter(s)         state.specs, active_adapters Trainer resume, TRL DPO
    add_adapter(name, PeftConfig)          add_adapter(name, spec)      TRL DPO's reference adapter
    disable_adapter()                      disable_adapters()           TRL DPO's reference pass
    set_adapter(name, inference_mode)      set_adapter(names)           Trainer resume, TRL DPO
    print_trainable_parameters()           report().print()
    get_nb_trainable_parameters()          adapter_parameters()
    merge_and_unload()                     merged_module()  (a copy; your model is untouched)
    merge_adapter() / unmerge_adapter()    merge() / unmerge()
    unload()                               (your model, which was never changed)

Every other PeftModel member is blocked (`blocked_members`): it would reach PEFT's `base_model`
tuner, which does not exist here, or run the un-adapted model. A blocked method raises an
AdapterError naming what to use instead; a blocked property raises AdapterAttributeError, so
`hasattr()` sees it as missing. `generate` is ours (integrations/generation.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .. import checkpoint
from ..errors import AdapterAttributeError, AdapterError
from ..passes import method_for
from .model_view import PeftTunerView, view_of
from .trainer import check_driving_trainer

# what to use instead of a blocked PeftModel member
INSTEAD = {
    "from_pretrained": "ac.compile(model, 'adapter_dir') loads a PEFT adapter directory",
    "get_layer_status": "m.report() (what matched where, per layer)",
    "get_model_status": "m.report()",
    "get_prompt": "prompt-learning methods are not supported",
    "get_prompt_embedding_to_save": "prompt-learning methods are not supported",
    "prepare_model_for_gradient_checkpointing": "m.gradient_checkpointing_enable()",
    "push_to_hub": "m.save_pretrained(dir), then upload dir with huggingface_hub",
    "supports_lora_conversion": "not supported (PiSSA/CorDA/OLoRA conversion)",
}


def blocked_members(peft_cls: type, own: set[str]) -> dict:
    """A refusing stub for every member of `peft_cls` (and its bases up to nn.Module) that the
    AdaptedModule side does not define (`own`)."""
    from torch import nn

    out = {}
    for cls in peft_cls.__mro__:
        if cls in (nn.Module, object):
            continue
        for name, member in vars(cls).items():
            if name in own or name in out or (name.startswith("__") and name.endswith("__")):
                continue
            out[name] = _stub(name, member)
    return out


def _stub(name: str, member):
    why = INSTEAD.get(name, "PEFT's implementation works on modules it replaced inside your model, which "
                            "adapt_compiler never does")
    message = f"PeftModel.{name} is not available on an AdaptedModule: {why}."
    if isinstance(member, property):
        def fget(self):
            raise AdapterAttributeError(message)

        return property(fget, doc=message)

    def refuse(*args, **kwargs):
        raise AdapterError(message)

    refuse.__name__ = name
    refuse.__doc__ = message
    if isinstance(member, (classmethod, staticmethod)):
        return staticmethod(refuse)
    return refuse


def peft_config_of(table, name: str):
    """A peft.PeftConfig for adapter `name` (a snapshot of its spec); the config dict without peft."""
    config = checkpoint.peft_config(table, name)
    config["inference_mode"] = not any(p.requires_grad for a, _, _, p in table.tensors() if a == name)
    try:
        from peft import PeftConfig
    except Exception:  # noqa: BLE001 - without PEFT the plain dict is what adapter_config.json holds
        return config
    return PeftConfig.from_peft_type(**{k: v for k, v in config.items() if not k.startswith("_")})


def spec_of(spec_or_config):
    """An adapter spec from a spec or a peft.PeftConfig (TRL's DPO passes `m.peft_config["default"]`)."""
    if hasattr(spec_or_config, "peft_type") and hasattr(spec_or_config, "to_dict"):
        config = spec_or_config.to_dict()
        config["peft_type"] = getattr(config["peft_type"], "value", config["peft_type"])
        return checkpoint.spec_from_config(config, f"{type(spec_or_config).__name__}"), True
    return spec_or_config, False


# PEFT's load_adapter options: honoured here, or refused by name
_LOAD_OPTIONS = {"torch_device", "autocast_adapter_dtype", "low_cpu_mem_usage", "ephemeral_gpu_offload", "key_mapping"}


def check_load_options(options: dict, device: torch.device) -> bool:
    """Validate PEFT's load_adapter keyword arguments; returns autocast_adapter_dtype."""
    unknown = sorted(set(options) - _LOAD_OPTIONS)
    if unknown:
        raise AdapterError(f"load_adapter: unsupported option(s) {unknown} (adapters load from a local directory; "
                           f"supported: is_trainable, hotswap, {sorted(_LOAD_OPTIONS)}).")
    if options.get("ephemeral_gpu_offload"):
        raise AdapterError("load_adapter: ephemeral_gpu_offload=True is not supported; move the module with m.to().")
    if options.get("key_mapping") is not None:
        raise AdapterError("load_adapter: key_mapping is not supported; save the adapter with PEFT's key names.")
    where = options.get("torch_device")
    if where is not None and torch.device(where).type != device.type:
        raise AdapterError(f"load_adapter: torch_device={where!r}, but the module runs on {device}; call m.to() "
                           f"first (adapters always load onto the module's device).")
    return bool(options.get("autocast_adapter_dtype", True))


def autocast_adapter(table, name: str) -> None:
    """PEFT's autocast_adapter_dtype=True: a new adapter's float16/bfloat16 tensors become float32."""
    with torch.no_grad():
        for a, _, _, p in table.tensors():
            if a == name and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()


class PeftSurface:
    """Mixin for AdaptedModule (see the module docstring). Expects the AdaptedModule's API."""

    # -- what Trainer / TRL read ---------------------------------------------------------------
    _keys_to_ignore_on_save = None  # Trainer._issue_warnings_after_load reads it

    def get_base_model(self):
        """PeftModel.get_base_model: the adapted model as an HF model (integrations/model_view.py).
        Your model itself is never returned: clients modify what they get (TRL replaces its forward)."""
        check_driving_trainer(self)
        return view_of(self)

    @property
    def base_model(self):
        """PeftModel.base_model: the tuner, whose `.model` is get_base_model()."""
        return PeftTunerView(view_of(self))

    @property
    def peft_config(self) -> dict:
        """Adapter name -> peft.PeftConfig (a snapshot built from the spec; changing it changes nothing)."""
        return {name: peft_config_of(self.table, name) for name in self.state.specs}

    @property
    def active_adapter(self) -> str:
        return self.state.active[0]

    @property
    def active_peft_config(self):
        return peft_config_of(self.table, self.active_adapter)

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for spec in self.state.specs.values() for m in (spec.modules_to_save or [])}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        return self.adapters_enabled and bool(self.state.active)

    @property
    def base_model_torch_dtype(self) -> torch.dtype:
        return self.dtype

    # -- counting ----------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, counted as PeftModel counts them (base + adapters)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        save_embedding_layers="auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion=None, **kwargs) -> None:
        """PeftModel.save_pretrained: adapter "default" in `save_directory`, every other adapter in
        `save_directory/<name>/` (PEFT's layout, which Trainer's resume reads back)."""
        if kwargs.get("state_dict") is not None:
            raise AdapterError(
                "save_pretrained(state_dict=...) is not supported: a full state dict (FSDP / DeepSpeed) holds the "
                "frozen base too; adapters are saved from the module itself."
            )
        kwargs.pop("state_dict", None)
        unknown = sorted(kwargs)
        if unknown:
            raise AdapterError(f"save_pretrained: unsupported option(s) {unknown}.")
        if not safe_serialization:
            raise AdapterError("save_pretrained: safe_serialization=False is not supported; adapters are written "
                               "as safetensors (adapter_model.safetensors), which PEFT loads.")
        if save_embedding_layers is True:
            raise AdapterError("save_pretrained: save_embedding_layers=True is not supported; the base embeddings are "
                               "frozen and unchanged here, so there is nothing to save with the adapter.")
        if os.path.isfile(save_directory):
            raise AdapterError(f"save_pretrained: {save_directory} is a file; pass a directory.")
        names = list(self.state.specs) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.state.specs]
        if unknown:
            raise AdapterError(f"save_pretrained: selected_adapters {unknown} do not exist; known: "
                               f"{list(self.state.specs)}.")
        if not is_main_process:
            return
        convert = None
        if path_initial_model_for_weight_conversion is not None:  # PiSSA / OLoRA / CorDA -> plain LoRA (rank 2r)
            convert = {n: path_initial_model_for_weight_conversion for n in names}
        checkpoint.save_adapter(self.table, save_directory, names, layout="peft", convert=convert)
        self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir) -> None:
        """PeftModel's README.md card: `library_name: peft`, the base model and the tags (an
        existing card keeps its text; its front matter is replaced)."""
        path = Path(output_dir) / "README.md"
        config = getattr(self.table.model, "config", None)
        base = getattr(config, "_name_or_path", None) or None
        tags = sorted({*(self.model_tags or []), *(method_for(s).name for s in self.state.specs.values())})
        front = ["---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags:",
                 *[f"- {t}" for t in tags], "---"]
        old = path.read_text() if path.exists() else ""
        body = old.split("---", 2)[2] if old.startswith("---") and old.count("---") >= 2 else old
        checkpoint.write_text_atomic(path, "\n".join(front) + "\n" + body.lstrip("\n"))

    # -- adapters ----------------------------------------------------------------------------------
    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """PeftModel.set_requires_grad: (un)freeze the named adapters' tensors."""
        names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
        unknown = [n for n in names if n not in self.state.specs]
        if unknown:
            raise AdapterError(f"set_requires_grad: unknown adapter(s) {unknown}; known: {list(self.state.specs)}.")
        for a, _, _, p in self.table.tensors():
            if a in names:
                p.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self):
        """PeftModel.disable_adapter (context manager): run the base model; the previous state comes back."""
        was = self.adapters_enabled
        self.disable_adapters()
        try:
            yield
        finally:
            if was:
                self.enable_adapters()

    def enable_adapter_layers(self) -> None:
        self.enable_adapters()

    def disable_adapter_layers(self) -> None:
        self.disable_adapters()

    def merge_adapter(self, adapter_names=None) -> None:
        self._check_active(adapter_names, "merge_adapter")
        self.merge()

    def unmerge_adapter(self) -> None:
        self.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """PeftModel.merge_and_unload: the base architecture with the active adapters merged into its
        weights. Here a new module (merged_module()); your model is not modified. `safe_merge`
        checks the merged weights for NaN/Inf, as PEFT does."""
        self._check_active(adapter_names, "merge_and_unload")
        merged = self.merged_module()
        if safe_merge:
            bad = [n for n, p in merged.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise AdapterError(f"merge_and_unload(safe_merge=True): NaN/Inf in the merged weights of {bad[:5]}; "
                                   f"the adapter is broken.")
        return merged

    def unload(self):
        """PeftModel.unload: the base model without adapters, which is your model (never modified)."""
        return self.table.model

    def _check_active(self, adapter_names, where: str) -> None:
        if adapter_names is not None and tuple(adapter_names) != tuple(self.state.active):
            raise AdapterError(f"{where}(adapter_names={list(adapter_names)}): merge the active adapters only; call "
                               f"m.set_adapter({list(adapter_names)}) first (active: {list(self.state.active)}).")

