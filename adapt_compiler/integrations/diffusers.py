"""What diffusers pipelines read from their denoiser (`pipe.unet = m`, `pipe.transformer = m`).

`config`, `dtype` and `device` come from hf_model.py (every HF client reads them). Pipelines read more:
SDXL sizes its time ids from `unet.add_embedding.linear_1.in_features`, IP-adapters read
`unet.encoder_hid_proj`, Flux wraps each call in `transformer.cache_context("cond")`. A diffusers
`ModelMixin`'s submodules and plain attributes are therefore readable through the AdaptedModule
(as through a PeftModel); its methods are not, because they would act on the user's model (e.g.
`fuse_qkv_projections`, `set_attn_processor`), which the captured graph no longer follows.

A denoiser's example inputs (for `adapt-compiler inspect`, default targets) are in example_inputs.py.
"""

from __future__ import annotations

import contextlib
import inspect

from ..example_inputs import is_diffusers_model




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
