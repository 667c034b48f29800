"""Small example inputs built from a model's config or first layer, for a capture that only needs the
graph's structure (default targets found in the graph, `adapt-compiler inspect`)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .errors import AdapterError


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8, input_shape=None) -> tuple[tuple, dict]:
    """(args, kwargs) small enough to capture quickly, built from the model's config or first layer."""
    g = torch.Generator().manual_seed(0)
    if input_shape:
        return (torch.randn(*input_shape, generator=g),), {}
    denoiser = _denoiser_inputs(model, batch=batch, seq=seq)
    if denoiser is not None:
        return denoiser
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    kwargs = {}
    if "input_features" in params:  # speech encoders (Whisper): (batch, mel bins, frames)
        bins = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 1500)
        kwargs["input_features"] = torch.randn(batch, bins, frames, generator=g)
    elif "input_ids" in params:
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
        vocab = vocab or _embedding_rows(model) or 100
        kwargs["input_ids"] = torch.randint(0, min(vocab, 1000), (batch, seq), generator=g)
        if "attention_mask" in params:
            kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    image_tokens = _image_tokens(model, config) if "pixel_values" in params and "input_ids" in kwargs else None
    if "pixel_values" in params and ("input_ids" not in kwargs or _needs_pixels(model) or image_tokens):
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        kwargs["pixel_values"] = torch.randn(batch, getattr(vision, "num_channels", 3), size, size, generator=g)
    if image_tokens:
        # one image per sample: its tokens after the first text token, so the vision tower runs in the capture
        token, count = image_tokens
        ids = kwargs["input_ids"]
        ids = torch.where(ids == token, torch.full_like(ids, int(token == 0)), ids)  # text: never the image token
        ids = torch.cat([ids[:, :1], torch.full((batch, count), token, dtype=ids.dtype), ids[:, 1:]], dim=1)
        kwargs["input_ids"] = ids
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = torch.ones_like(ids)
    if kwargs:
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kwargs["decoder_input_ids"] = torch.ones(batch, max(seq // 2, 1), dtype=torch.long)
        return (), kwargs
    for mod in model.modules():  # a plain nn.Module: the first layer says what it eats
        if isinstance(mod, nn.Conv2d):
            return (torch.randn(batch, mod.in_channels, 16, 16, generator=g),), {}
        if isinstance(mod, nn.Linear):
            return (torch.randn(batch, mod.in_features, generator=g),), {}
        if isinstance(mod, nn.Embedding):
            return (torch.randint(0, mod.num_embeddings, (batch, seq), generator=g),), {}
    raise AdapterError(
        f"cannot guess an example input for {type(model).__name__}; pass example inputs (e.g. --input-shape 1,3,32,32, "
        f"or ac.compile(..., example_inputs=batch))."
    )


def _needs_pixels(model: nn.Module) -> bool:
    """Dual encoders (CLIP-like: a text and a vision tower and no language head) need both inputs."""
    names = {n.split(".")[0] for n, _ in model.named_children()}
    return {"text_model", "vision_model"} <= names


def _image_tokens(model: nn.Module, config) -> tuple[int, int] | None:
    """(image token id, positions one image fills in input_ids) for a Llava-style model: a vision tower
    whose patch features (less the class token with vision_feature_select_strategy="default") replace the
    image tokens one for one; None for other models, and for layouts with tiling (image_grid_pinpoints),
    whose count depends on each image's size."""
    vision = getattr(config, "vision_config", None)
    token = getattr(config, "image_token_index", getattr(config, "image_token_id", None))
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if vision is None or not isinstance(token, int) or strategy not in ("default", "full") or \
            getattr(config, "image_grid_pinpoints", None):
        return None
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int):
        return None
    tower = [m for n, m in model.named_modules() if n.endswith("vision_tower")]
    cls = int(any(hasattr(m, "class_embedding") for t in tower[:1] for m in t.modules()))  # CLIP's; SigLIP has none
    return token, (size // patch) ** 2 + cls - (strategy == "default")


def _embedding_rows(model: nn.Module) -> int | None:
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return mod.num_embeddings
    return None


def is_diffusers_model(model) -> bool:
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in type(model).__mro__)


def _denoiser_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[tuple, dict] | None:
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
