"""What diffusers pipelines read from their denoiser (`pipe.unet = m`, `pipe.transformer = m`).

`config`, `dtype` and `device` come from hf_model.py (every HF client reads them). Pipelines read more:
SDXL sizes its time ids from `unet.add_embedding.linear_1.in_features`, IP-adapters read
`unet.encoder_hid_proj`, Flux wraps each call in `transformer.cache_context("cond")`. A diffusers
`ModelMixin`'s submodules and plain attributes are therefore readable through the AdaptedModule
(as through a PeftModel); its methods are not, because they would act on the user's model (e.g.
`fuse_qkv_projections`, `set_attn_processor`), which the captured graph no longer follows.

Also here: a denoiser's example inputs, for `adapt-compiler inspect` on a diffusers model.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn


def is_diffusers_model(model) -> bool:
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in type(model).__mro__)


class DiffusersModelAttributes:
    """Mixin for AdaptedModule: expects `self.table` (table.py)."""

    def cache_context(self, name: str):
        """diffusers' CacheMixin.cache_context: names the branch (cond/uncond) for cache hooks. The
        captured graph has none of the model's hooks, so there is nothing to name: a no-op context."""
        if not hasattr(self.table.model, "cache_context"):
            raise AttributeError(f"{type(self.table.model).__name__} has no `cache_context`")
        return contextlib.nullcontext()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # HFModelAttributes: nn.Module members, then model data attributes
        except AttributeError as missing:
            table = self.__dict__.get("table")
            model = table.model if table is not None else None
            if model is None or name.startswith("_") or not is_diffusers_model(model):
                raise
            value = getattr(type(model), name, None)
            if inspect.isfunction(value):  # a method
                raise AttributeError(
                    f"{name}() of {type(model).__name__} is not available on the AdaptedModule: it would act on "
                    f"your model, which the compiled graph no longer follows. Call it on the model before "
                    f"ac.compile()."
                ) from missing
            try:
                return getattr(model, name)  # a submodule or a plain value: read from the user's model
            except AttributeError:
                raise missing from None


# -- example inputs ------------------------------------------------------------------------------------
def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[tuple, dict] | None:
    """(args, kwargs) of one small call of a diffusers UNet, VAE or SD3/Flux transformer; None otherwise."""
    if not is_diffusers_model(model):
        return None
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    name = type(model).__name__
    size = cfg.get("sample_size", 8)
    size = min(size if isinstance(size, int) else size[0], 16)
    timestep = torch.full((batch,), 10)
    if name == "UNet2DConditionModel":
        sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
        text = torch.randn(batch, seq, cfg.cross_attention_dim, generator=g)
        return (sample, timestep), {"encoder_hidden_states": text}
    if name == "UNet2DModel":
        return (torch.randn(batch, cfg.in_channels, size, size, generator=g), timestep), {}
    if name == "AutoencoderKL":
        return (torch.randn(batch, cfg.in_channels, 2 * size, 2 * size, generator=g),), {}
    if name == "SD3Transformer2DModel":
        return (), {"hidden_states": torch.randn(batch, cfg.in_channels, size, size, generator=g),
                    "encoder_hidden_states": torch.randn(batch, seq, cfg.joint_attention_dim, generator=g),
                    "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                    "timestep": timestep}
    if name == "FluxTransformer2DModel":
        tokens = size * size // 4
        return (), {"hidden_states": torch.randn(batch, tokens, cfg.in_channels, generator=g),
                    "encoder_hidden_states": torch.randn(batch, seq, cfg.joint_attention_dim, generator=g),
                    "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                    "timestep": timestep.float() / 1000, "img_ids": torch.zeros(tokens, 3),
                    "txt_ids": torch.zeros(seq, 3),
                    **({"guidance": torch.full((batch,), 3.5)} if cfg.guidance_embeds else {})}
    return None
