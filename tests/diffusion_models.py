"""Tiny `diffusers` models and pipeline parts from configs, with random weights (nothing downloaded).

Each builder returns the model in eval mode; `*_inputs` return (args, kwargs) of one denoiser call.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusion tests need the optional `diffusers` package")


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_unet(seed: int = 0, **overrides):
    """UNet2DConditionModel: CrossAttnDownBlock2D + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D (the issue's
    layout), channels (16, 32), cross-attention dim 16, 8×8 latents; `overrides` replace config entries."""
    _seeded(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    return diffusers.UNet2DConditionModel(**{**config, **overrides}).eval()


def unet_inputs(batch: int = 2, size: int = 8, cross_attention_dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timestep = torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2))
    text = torch.randn(batch, 5, cross_attention_dim, generator=g)
    return (sample, timestep), {"encoder_hidden_states": text}


def tiny_unet2d(seed: int = 0):
    """UNet2DModel (unconditional, DDPM-style) with a self-attention down and up block."""
    _seeded(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def unet2d_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([10, 500][:batch])), {}


def tiny_vae(seed: int = 0, **overrides):
    """AutoencoderKL, 2 blocks (a factor 2 between pixels and latents), 4 latent channels, 16×16 images."""
    _seeded(seed)
    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=16)
    return diffusers.AutoencoderKL(**{**config, **overrides}).eval()


def vae_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    # sample_posterior=False: the forward is deterministic (the latent is the posterior's mode)
    return (torch.randn(batch, 3, 16, 16, generator=g),), {}


def tiny_sd3(seed: int = 0):
    _seeded(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def sd3_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (), {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "timestep": torch.tensor([10, 500][:batch]),
    }


def tiny_flux(seed: int = 0):
    _seeded(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (), {
        "hidden_states": torch.randn(batch, 16, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "timestep": torch.tensor([0.01, 0.5][:batch]),
        "img_ids": torch.randn(16, 3, generator=g),
        "txt_ids": torch.randn(5, 3, generator=g),
    }


# -- text side and pipelines -------------------------------------------------------------------------------
def tiny_text_encoder(seed: int = 0, hidden: int = 16, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         projection_dim=hidden)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def tiny_tokenizer(tmp_path):
    """An offline CLIPTokenizer over a few words and single letters (its files written to tmp_path)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in ("a", "cat", "dog", "photo", "of", "red"):
        vocab.setdefault(word + "</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)


def tiny_sd_pipeline(tmp_path, unet=None):
    """A StableDiffusionPipeline of tiny parts: UNet (cross-attention dim 16), VAE, CLIP text encoder, DDIM."""
    unet = unet if unet is not None else tiny_unet()
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(tmp_path),
        scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sd(pipe, steps: int = 2):
    """The pipeline's own __call__: 2 DDIM steps at 16×16 pixels (8×8 latents), classifier-free guidance on
    (batch 2 through the UNet), fixed seed; the image as a numpy array."""
    return pipe("a photo of a cat", num_inference_steps=steps, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# -- adapter files as the community's tools write them ----------------------------------------------------
def kohya_name(prefix: str, fqn: str) -> str:
    return f"{prefix}_{fqn.replace('.', '_')}"


def kohya_lora(model, prefix: str, plan: dict, seed: int) -> dict:
    """kohya LoRA tensors for every module whose last name is in `plan`: leaf -> (rank, alpha or None)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for fqn, mod in model.named_modules():
        leaf = fqn.split(".")[-1] if not fqn.endswith("to_out.0") else "to_out.0"
        if leaf not in plan or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        r, alpha = plan[leaf]
        name = kohya_name(prefix, fqn)
        kernel = tuple(mod.kernel_size) if isinstance(mod, torch.nn.Conv2d) else ()
        d_in = mod.in_channels if kernel else mod.in_features
        d_out = mod.out_channels if kernel else mod.out_features
        out[f"{name}.lora_down.weight"] = torch.randn(r, d_in, *kernel, generator=g) * 0.2
        out[f"{name}.lora_up.weight"] = torch.randn(d_out, r, *[1] * len(kernel), generator=g) * 0.2
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out
