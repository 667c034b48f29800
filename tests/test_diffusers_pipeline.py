"""diffusers pipelines run an AdaptedModule as their denoiser: `pipe.unet = m`, `pipe.transformer = m`.

The pipeline's own `__call__` (2 steps, tiny sizes, classifier-free guidance) makes the image; the
reference is the same pipeline with diffusers' own adapter API (`unet.add_adapter(LoraConfig)`, PEFT
underneath) holding the same adapter weights. `pipe.to(torch.float16)` casts our module as it casts
every component, and the image still equals PEFT's in that dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapt_compiler as ac
from diffusion_models import diffusers, run_sd, tiny_flux, tiny_sd_pipeline, tiny_unet, tiny_vae
from oracle import randomize_

peft = pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _pair(model, targets, seed=1):
    """(diffusers' own adapter on a copy of `model`, ours with the same weights), LoRA r=4 α=8."""
    ref = copy.deepcopy(model)
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_(ref, ("lora_",), seed=seed, scale=0.3)
    m = ac.compile(model, ac.LoRA(r=4, alpha=8, targets=targets), lowering="eager")
    m.load_adapter_state_dict(peft.get_peft_model_state_dict(ref))
    return ref, m


def test_sd_pipeline_runs_our_unet_and_its_image_equals_peft(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    unet = pipe.unet
    base = run_sd(pipe)
    ref, m = _pair(unet, ATTENTION + ["conv1"])
    pipe.unet = m  # what the pipeline reads: m.config (sample_size, in_channels, ...), m.dtype, m.device
    ours = run_sd(pipe)
    pipe.unet = ref
    theirs = run_sd(pipe)
    assert abs(ours - theirs).max() < 1e-5, abs(ours - theirs).max()
    assert abs(theirs - base).max() > 1e-3, "the adapter must change the image"

    # float16, as users run pipelines: pipe.to() casts every component, ours included (a re-capture)
    pipe.unet = m
    pipe.to(torch.float16)
    assert m.dtype == torch.float16 and unet.dtype == torch.float32  # the user's model is not cast
    ours16 = run_sd(pipe)
    pipe.unet = ref.to(torch.float16)
    theirs16 = run_sd(pipe)
    assert abs(ours16 - theirs16).max() < 2e-2, abs(ours16 - theirs16).max()
    assert abs(ours16 - ours).max() < 5e-2  # and it is the same image, in half precision


def test_unet_in_bfloat16_is_as_close_to_float32_as_peft():
    """m.to(torch.bfloat16) re-captures in bfloat16; its error against the float32 result is PEFT's own
    bfloat16 error, not more (bfloat16 keeps ~3 digits, so two bf16 runs differ by rounding order)."""
    unet = tiny_unet()
    ref, m = _pair(unet, ATTENTION)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]))
    text = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        exact = ref(*args, encoder_hidden_states=text).sample
        m, ref = m.to(torch.bfloat16), ref.to(torch.bfloat16)
        ours = m(args[0].bfloat16(), args[1], encoder_hidden_states=text.bfloat16()).sample
        theirs = ref(args[0].bfloat16(), args[1], encoder_hidden_states=text.bfloat16()).sample
    assert ours.dtype == torch.bfloat16 and m.dtype == torch.bfloat16 and unet.dtype == torch.float32
    ours_err, peft_err = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert ours_err <= 1.5 * peft_err + 1e-3, (ours_err, peft_err)


def test_flux_pipeline_runs_our_transformer_and_its_image_equals_peft():
    """`pipe.transformer = m` in a FluxPipeline (prompt embeddings given, so no text encoders): Flux wraps
    each denoiser call in `transformer.cache_context(...)`."""
    flux = tiny_flux()
    vae = tiny_vae(latent_channels=2, shift_factor=0.0, scaling_factor=1.0)  # Flux packs 2×2 latents: 8 channels
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=flux)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    call = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                num_inference_steps=2, height=16, width=16, output_type="np", guidance_scale=1.0)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    ref, m = _pair(flux, ATTENTION + ["proj_mlp"])
    pipe.transformer = m
    ours = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.transformer = ref
    theirs = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert abs(ours - theirs).max() < 1e-5, abs(ours - theirs).max()
    assert abs(theirs - base).max() > 1e-3, "the adapter must change the image"


def test_pipelines_read_the_denoisers_submodules_but_not_its_methods():
    """SDXL sizes its time ids from `unet.add_embedding.linear_1.in_features`; a method such as
    `fuse_qkv_projections` would change the user's model behind the compiled graph, so it is refused."""
    unet = tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=40)
    m = ac.compile(unet, ac.LoRA(r=2, targets=["to_q"]), lowering="eager")
    assert m.add_embedding is unet.add_embedding and m.add_embedding.linear_1.in_features == 40
    assert m.config is unet.config and m.config.sample_size == 8
    with pytest.raises(AttributeError, match="no `cache_context`"):  # a transformers' CacheMixin method (Flux)
        m.cache_context("cond")
    with pytest.raises(AttributeError, match=r"fuse_qkv_projections\(\) of UNet2DConditionModel .* before ac.compile"):
        m.fuse_qkv_projections()
    with pytest.raises(AttributeError):
        m.no_such_attribute


def test_readme_diffusers_section(tmp_path, monkeypatch):
    """The README's diffusers section runs as written: a tiny pipeline stands for `pipe`, a kohya file with
    UNet and text-encoder parts for style.safetensors; eager lowering and 2 steps keep it quick."""
    import functools
    import re
    from pathlib import Path

    from safetensors.torch import save_file

    from adapt_compiler import formats
    from diffusion_models import kohya_lora

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Diffusion models (diffusers)", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert "pipe.unet = ac.compile(pipe.unet, \"style.safetensors\")" in code
    code = code.replace("num_inference_steps=30", "num_inference_steps=2")
    pipe = tiny_sd_pipeline(tmp_path)
    user_unet, user_te = pipe.unet, pipe.text_encoder
    save_file({**kohya_lora(user_unet, "lora_unet", {"to_q": (4, 4.0), "to_v": (4, 4.0)}, seed=0),
               **kohya_lora(user_te, "lora_te_text_model", {"q_proj": (2, 2.0)}, seed=1)},
              tmp_path / "style.safetensors")
    monkeypatch.setattr(ac, "compile", functools.partial(ac.compile, lowering="eager"))
    monkeypatch.chdir(tmp_path)
    scope = {"pipe": pipe, "unet": tiny_unet()}
    exec(compile(code, "README diffusers section", "exec"), scope)  # noqa: S102 - our own docs

    assert isinstance(pipe.unet, ac.AdaptedModule) and isinstance(pipe.text_encoder, ac.AdaptedModule)
    assert len(pipe.unet.slots_of("default")) == 16 and len(pipe.text_encoder.slots_of("default")) == 2
    assert pipe.unet.dtype == torch.float16 and user_unet.dtype == torch.float32
    assert scope["image"].size == (16, 16)
    assert formats.detect(tmp_path / "my_style.safetensors")[0] == "kohya"
    assert formats.detect(tmp_path / "my_style")[0] == "diffusers"


def test_inspect_builds_inputs_for_diffusers_models():
    """`adapt-compiler inspect --model ...` captures one call; for diffusers denoisers and VAEs the example
    inputs come from the model's config (integrations/diffusers.py), and each model runs on them."""
    from adapt_compiler.commands.inspect import example_inputs
    from diffusion_models import tiny_sd3, tiny_unet2d

    for model in (tiny_unet(), tiny_unet2d(), tiny_vae(), tiny_sd3(), tiny_flux()):
        args, kwargs = example_inputs(model, batch=2, seq=5)
        with torch.no_grad():
            out = model(*args, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0]
        assert out.shape[0] == 2 and torch.isfinite(out).all(), type(model).__name__
