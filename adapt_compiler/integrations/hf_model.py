"""What every Hugging Face client reads from a model: its config, device, dtype and embeddings.

AdaptedModule inherits `HFModelAttributes`, so `pipe.unet = m`, Trainer, TRL and `generate` find
the attributes they read on a `PreTrainedModel` (or a diffusers `ModelMixin`). Reads go to the
user's model, where the value is the model's own (its config object is shared, as PeftModel shares
it); device and dtype are those of the tensors this module runs with (after `m.to(...)` they differ
from the user's model, which never moves).

Attributes this class does not define read through to the user's model, as PeftModel forwards
them (`loss_type`, `name_or_path`, `accepts_loss_kwargs`, `hf_device_map`, ...), with two
exceptions that `read_through` refuses with an `AdapterAttributeError` (hasattr() sees them as
missing): a submodule of the user's model (calling it would run it without the adapters) and a
method of it (it would act on the un-adapted model, e.g. `resize_token_embeddings` or `generate`).
Private names never read through.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import AdapterAttributeError

# keyword inputs whose values never change the graph, passed as 0-dim tensors so that every value
# shares one capture. HF's loss functions take `num_items_in_batch` as a tensor or an int and do
# the same arithmetic with either (`loss / num_items_in_batch`). Counts that a model *branches* on
# are not here: Llama's `logits_to_keep` is a count as an int and an index tensor otherwise.
LIFTED_SCALARS = frozenset({"num_items_in_batch"})


def lift_scalar_inputs(kwargs: dict) -> dict:
    """`kwargs` with the LIFTED_SCALARS given as Python numbers turned into 0-dim tensors."""
    if not any(k in kwargs and isinstance(kwargs[k], (int, float)) and not isinstance(kwargs[k], bool)
               for k in LIFTED_SCALARS):
        return kwargs
    return {k: torch.tensor(v) if k in LIFTED_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
            else v for k, v in kwargs.items()}


def read_through(model: nn.Module, name: str, owner: str):
    """`model.<name>` for a data attribute; refuses submodules and methods (see the module docstring)."""
    value = getattr(model, name)  # AttributeError from the model itself when it has no such attribute
    cls = type(model).__name__
    if isinstance(value, nn.Module):
        raise AdapterAttributeError(
            f"{owner}.{name}: {cls}.{name} is a submodule of your model; called directly it would run without the "
            f"adapters (your model is never modified). Call the adapted module itself, or m.get_base_model()."
        )
    if inspect.ismethod(value):
        raise AdapterAttributeError(
            f"{owner}.{name}: {cls}.{name}() would act on your un-adapted model (adapt_compiler never modifies it). "
            f"Call it on your model if that is what you mean, or on m.merged_module() for the adapted weights."
        )
    return value


def forward_signature(model_cls: type) -> inspect.Signature:
    """The model class's forward signature (self first) with keyword-only `adapter_names` added
    before any `**kwargs`."""
    try:
        sig = inspect.signature(model_cls.forward)
    except (TypeError, ValueError):
        sig = inspect.signature(lambda self, *args, **kwargs: None)
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    return sig.replace(parameters=params, return_annotation=inspect.Signature.empty)


class HFModelAttributes:
    """Mixin for AdaptedModule: expects `self.table` (table.py)."""

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("_") or "table" not in self.__dict__:
                raise
        return read_through(self.__dict__["table"].model, name, type(self).__name__)

    def _get_name(self) -> str:
        # Trainer picks the label shift for label smoothing by this name (a causal LM shifts)
        return type(self.table.model).__name__

    def __repr__(self) -> str:
        return nn.Module.__repr__(self).replace(self._get_name() + "(", type(self).__name__ + "(", 1)

    @property
    def config(self):
        """The user's model config (transformers PretrainedConfig, diffusers FrozenDict), shared."""
        config = getattr(self.table.model, "config", None)
        if config is None:
            raise AttributeError(f"{type(self.table.model).__name__} has no `config`")
        return config

    @property
    def generation_config(self):
        config = getattr(self.table.model, "generation_config", None)
        if config is None:
            raise AttributeError(f"{type(self.table.model).__name__} has no `generation_config`")
        return config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.table.model.generation_config = value

    @property
    def main_input_name(self) -> str:
        return getattr(self.table.model, "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        """The device of the frozen base tensors this module runs with."""
        first = next(iter(self.table.frozen.values()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base's floating-point parameters this module runs with."""
        for t in self.table.frozen.values():
            if isinstance(t, nn.Parameter) and t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def get_input_embeddings(self) -> nn.Module:
        return self.table.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.table.model.get_output_embeddings()

    # -- counting (Trainer's total_flos reads num_parameters(exclude_embeddings=True)) ----------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """PreTrainedModel.num_parameters of the adapted model: the base's parameters (those of
        nn.Embedding modules left out with `exclude_embeddings`) plus the adapters'; with
        `only_trainable`, the parameters that require grad (the active adapters')."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.table.frozen[f"{n}.weight"]) for n, mod in self.table.model.named_modules()
                    if isinstance(mod, nn.Embedding) and f"{n}.weight" in self.table.frozen}
        total = 0
        for p in self.parameters():
            if id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            total += p.numel()
        return total

    def floating_point_ops(self, input_dict: dict, exclude_embeddings: bool = True) -> int:
        """PreTrainedModel.floating_point_ops: 6 · tokens · parameters (forward + backward)."""
        tokens = input_dict[self.main_input_name].numel() if self.main_input_name in input_dict else 0
        return 6 * tokens * self.num_parameters(exclude_embeddings=exclude_embeddings)

    # -- tags (TRL's trainers add theirs; PEFT would write them into your model) -----------------
    @property
    def model_tags(self) -> list[str] | None:
        own = self.__dict__.get("_model_tags")
        theirs = getattr(self.table.model, "model_tags", None)
        if own is None and theirs is None:
            return None
        return list(dict.fromkeys([*(theirs or []), *(own or [])]))

    def add_model_tags(self, tags: list[str] | str) -> None:
        """PreTrainedModel.add_model_tags, kept on this module (your model's own tags are not changed)."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.__dict__["_model_tags"] = list(dict.fromkeys([*(self.__dict__.get("_model_tags") or []), *tags]))
