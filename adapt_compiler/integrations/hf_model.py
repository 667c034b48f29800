"""What every Hugging Face client reads from a model: its config, device, dtype and embeddings.

AdaptedModule inherits `HFModelAttributes`, so `pipe.unet = m`, Trainer, TRL and `generate` find
the attributes they read on a `PreTrainedModel` (or a diffusers `ModelMixin`). Reads go to the
user's model, where the value is the model's own (its config object is shared, as PeftModel shares
it); device and dtype are those of the tensors this module runs with (after `m.to(...)` they differ
from the user's model, which never moves).
"""

from __future__ import annotations

import torch
from torch import nn


class HFModelAttributes:
    """Mixin for AdaptedModule: expects `self.table` (table.py)."""

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
