"""The diffusion ecosystem's adapter files, in and out (adapt_compiler/formats/).

References: diffusers' own loaders (`pipe.load_lora_weights`, `load_lora_adapter`) with PEFT for what
diffusers loads (kohya LoRA, diffusers-layout LoRA and LoKr); for what it cannot load (kohya/LyCORIS
LoHa and LoKr on a UNet) PEFT's LoHa/LoKr models holding the converted tensors, plus the weight update
ComfyUI/LyCORIS compute from the file, written out in this file (`lycoris_delta`). Most comparisons run
our `merged_module()` (a plain model: no capture, so the file stays fast); `m(...)` itself is compared
where the forward is what is tested.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapt_compiler as ac
from adapt_compiler import formats
from adapt_compiler.errors import AdapterError, CheckpointError
from diffusion_models import (diffusers, kohya_lora, kohya_name, sd3_inputs, tiny_sd3, tiny_sd_pipeline,
                              tiny_text_encoder, tiny_unet, unet_inputs)
from oracle import assert_close, randomize_

peft = pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def sample(model, args, kwargs):
    out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


def text_out(model, ids):
    return model(input_ids=ids)[0]


IDS = torch.tensor([[0, 5, 9, 12, 1, 1, 1, 1], [0, 7, 3, 1, 1, 1, 1, 1]])


# -- building files the way the tools write them -----------------------------------------------------
def peft_to_kohya(peft_sd: dict, prefix: str, alphas: dict) -> dict:
    """LyCORIS keys for PEFT LoHa/LoKr tensors (same layouts, LyCORIS names): `fqn.hada_w1_a` ->
    `<prefix>_<fqn with _>.hada_w1_a`; `alphas`: fqn -> alpha (absent: no alpha key)."""
    out = {}
    for key, t in peft_sd.items():
        fqn, pname = key.removeprefix("base_model.model.").rsplit(".", 1)
        out[f"{kohya_name(prefix, fqn)}.{pname}"] = t
        if fqn in alphas:
            out[f"{kohya_name(prefix, fqn)}.alpha"] = torch.tensor(float(alphas[fqn]))
    return out


def lycoris_merged(model, file_sd: dict, prefix: str):
    """The model with W += ΔW as ComfyUI / LyCORIS compute it from the file (the format's definition):
    LoRA/LoHa scale alpha/rank (1 without alpha); LoKr alpha/rank if a factor is decomposed, else 1."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for fqn, mod in merged.named_modules():
            name = kohya_name(prefix, fqn)
            t = {k.split(".", 1)[1]: v for k, v in file_sd.items() if k.split(".", 1)[0] == name}
            if t:
                mod.weight += lycoris_delta(t, mod.weight.shape)
    return merged


def lycoris_delta(t: dict, shape) -> torch.Tensor:
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            delta = torch.nn.functional.conv2d(down.transpose(0, 1), up).transpose(0, 1)
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        return delta * (alpha / rank if alpha is not None else 1.0)
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (m1 * m2).reshape(shape) * (alpha / rank if alpha is not None else 1.0)
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1[:, :, None, None]
    scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * scale  # (kron views its inputs)


# -- kohya LoRA: diffusers is the reference ----------------------------------------------------------
@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("tok"))


def test_kohya_lora_unet_and_text_encoder_equal_diffusers(sd_pipe, tmp_path):
    """One kohya file for the UNet (attention r=4 α=2, 3×3 convs r=2 α=1, 1×1 proj_in r=3 α=1.5) and
    the text encoder (CLIP names with kohya's `text_model_`); each model takes its own part."""
    unet, te = sd_pipe.unet, sd_pipe.text_encoder
    plan = {**{k: (4, 2.0) for k in ATTENTION}, "conv1": (2, 1.0), "conv2": (2, 1.0), "proj_in": (3, 1.5)}
    sd = {**kohya_lora(unet, "lora_unet", plan, seed=0),
          **kohya_lora(te, "lora_te_text_model", {k: (2, 1.0) for k in CLIP}, seed=1)}
    path = tmp_path / "style.safetensors"
    save_file(sd, path)
    ref = copy.deepcopy(sd_pipe)
    ref.load_lora_weights(str(path))

    args, kwargs = unet_inputs()
    m = ac.compile(unet, str(path), lowering="eager")  # the real forward, once
    spec = m.state.specs["default"]
    assert (spec.r, spec.alpha) == (4, 2.0) and spec.rank_pattern["^down_blocks.0.resnets.0.conv1"] == 2
    want = sample(ref.unet, args, kwargs)
    assert_close(sample(m, args, kwargs), want, what="UNet from a kohya file vs diffusers")
    assert (want - sample(unet, args, kwargs)).abs().max() > 1e-3

    mt = ac.compile(te, str(path), lowering="eager")
    assert len(mt.slots_of("default")) == 2 * len(CLIP)
    assert_close(text_out(mt.merged_module(), IDS), text_out(ref.text_encoder, IDS), what="text encoder")


def test_kohya_lora_per_module_alphas_follow_the_format(sd_pipe, tmp_path):
    """Different alphas on attention projections (to_q α=8, to_v α=1 at r=4) and a module without alpha
    (to_k: scale 1): each module keeps its own scale, as kohya and ComfyUI apply it. diffusers 0.42 differs
    here: `_get_alpha_name` keys attention alphas `...processor.to_v_lora.down.weight.alpha`, which match
    no module, so every to_v gets the most common alpha; and a module without alpha gets the most common
    alpha instead of its rank. The format's definition is the reference."""
    unet = sd_pipe.unet
    sd = kohya_lora(unet, "lora_unet", {"to_q": (4, 8.0), "to_v": (4, 1.0), "to_k": (4, None), "conv1": (2, 3.0)},
                    seed=2)
    path = tmp_path / "alphas.safetensors"
    save_file(sd, path)
    m = ac.compile(unet, str(path), lowering="eager")
    args, kwargs = unet_inputs()
    assert_close(sample(m.merged_module(), args, kwargs), sample(lycoris_merged(unet, sd, "lora_unet"), args, kwargs))


def _sgm(fqn: str, layers_per_block: int) -> str:
    """kohya's SDXL (sgm) name of a diffusers UNet path with 2 down / 2 up blocks (the inverse of diffusers'
    `_maybe_map_sgm_blocks_to_diffusers`), for the attention and resnet paths this test uses."""
    parts = fqn.split(".")
    if parts[0] == "down_blocks":
        b, kind, layer = int(parts[1]), parts[2], int(parts[3])
        block = 1 + b * (layers_per_block + 1) + layer
        head = f"input_blocks_{block}_{1 if kind == 'attentions' else 0}"
    elif parts[0] == "up_blocks":
        b, kind, layer = int(parts[1]), parts[2], int(parts[3])
        head = f"output_blocks_{b * (layers_per_block + 1) + layer}_{1 if kind == 'attentions' else 0}"
    else:
        raise AssertionError(fqn)
    rest = "_".join(parts[4:])
    rest = {"conv1": "in_layers_2", "conv2": "out_layers_3"}.get(rest, rest)
    return f"{head}_{rest}"


def test_kohya_sdxl_sgm_names_resolve_through_diffusers_converter(tmp_path):
    unet = tiny_unet(layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    direct = kohya_lora(unet, "lora_unet", {"to_q": (2, 1.0), "to_v": (2, 1.0), "conv1": (2, 2.0)}, seed=4)
    direct = {k: v for k, v in direct.items() if "mid_block" not in k}
    sgm = {}
    for key, t in direct.items():
        name, tensor = key.split(".", 1)
        fqn = next(f for f, _ in unet.named_modules() if kohya_name("lora_unet", f) == name)
        sgm[f"lora_unet_{_sgm(fqn, 2)}.{tensor}"] = t
    assert not set(sgm) & set(direct)
    save_file(sgm, tmp_path / "sdxl.safetensors")
    state_dict, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "sdxl.safetensors"),
                                                                             unet_config=unet.config)
    ref = copy.deepcopy(unet)
    diffusers.StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=ref)
    m = ac.compile(unet, str(tmp_path / "sdxl.safetensors"), lowering="eager")
    assert {s.layer.fqn for s in m.slots_of("default")} == {
        next(f for f, _ in unet.named_modules() if kohya_name("lora_unet", f) == k.split(".")[0]) for k in direct}
    args, kwargs = unet_inputs()
    assert_close(sample(m.merged_module(), args, kwargs), sample(ref, args, kwargs), what="sgm names vs diffusers")


# -- kohya / LyCORIS LoHa and LoKr: PEFT with the converted tensors, and the format's own formula --------
LYCORIS_CASES = {
    # name: (PEFT config, per-module alpha rule) — ranks differ between attention and convs (rank_pattern)
    "loha": (lambda: peft.LoHaConfig(r=2, alpha=2, target_modules=["to_q", "to_v", "conv1", "conv2"],
                                     rank_pattern={"conv1": 4}), {"to_q": 3.0, "conv2": 1.0}),
    "loha_tucker": (lambda: peft.LoHaConfig(r=2, alpha=2, target_modules=["to_k", "conv1"],
                                            use_effective_conv2d=True), {"conv1": 5.0}),
    "lokr_low_rank_w2": (lambda: peft.LoKrConfig(r=2, alpha=2, target_modules=["to_q", "to_v", "conv1", "conv2"]),
                         {"to_q": 4.0, "conv1": 1.0}),
    "lokr_full_factors": (lambda: peft.LoKrConfig(r=16, alpha=16, target_modules=["to_q", "to_k"]),
                          {"to_q": 4.0}),  # both factors full: the file's alpha is ignored (scale 1)
    "lokr_decompose_both_tucker": (lambda: peft.LoKrConfig(r=2, alpha=2, target_modules=["to_out.0", "conv2"],
                                                           decompose_both=True, use_effective_conv2d=True,
                                                           decompose_factor=4), {"conv2": 3.0}),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_loha_lokr_files_equal_peft_and_the_format(case, tmp_path):
    make_config, alpha_rule = LYCORIS_CASES[case]
    unet = tiny_unet()
    pm = peft.get_peft_model(copy.deepcopy(unet), make_config())
    randomize_(pm, ("hada_", "lokr_"), seed=5, scale=0.3)
    peft_sd = peft.get_peft_model_state_dict(pm)
    alphas = {key.removeprefix("base_model.model.").rsplit(".", 1)[0]: a for key in peft_sd
              for leaf, a in alpha_rule.items() if key.removeprefix("base_model.model.").rsplit(".", 1)[0].endswith(leaf)}
    file_sd = peft_to_kohya(peft_sd, "lora_unet", alphas)
    save_file(file_sd, tmp_path / f"{case}.safetensors")

    m = ac.compile(unet, str(tmp_path / f"{case}.safetensors"), lowering="eager")
    args, kwargs = unet_inputs()
    ours = sample(m.merged_module(), args, kwargs)
    # the format's definition (ComfyUI / LyCORIS)
    assert_close(ours, sample(lycoris_merged(unet, file_sd, "lora_unet"), args, kwargs), what=f"{case} vs LyCORIS")
    # PEFT's own LoHa/LoKr model holding the converted tensors (ours saved as a PEFT dir, loaded by PEFT)
    m.save_adapter(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft").eval()
    assert_close(ours, sample(theirs, args, kwargs), what=f"{case} vs PEFT")
    assert (ours - sample(unet, args, kwargs)).abs().max() > 1e-3


# -- diffusers' layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
def test_diffusers_lora_file_equals_diffusers(sd_pipe, tmp_path, with_metadata):
    """A file written by diffusers' save_lora_weights from PEFT-adapted UNet and text encoder."""
    unet, te = copy.deepcopy(sd_pipe.unet), copy.deepcopy(sd_pipe.text_encoder)
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=8 if with_metadata else 4, target_modules=ATTENTION + ["conv1"],
                               rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 6} if with_metadata else {"conv1": 2})
    te_cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=CLIP)
    unet.add_adapter(unet_cfg)
    peft.inject_adapter_in_model(te_cfg, te)  # (transformers' te.add_adapter wants PEFT >= 0.22)
    randomize_(unet, ("lora_",), seed=6)
    randomize_(te, ("lora_",), seed=7)
    meta = dict(unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict()) \
        if with_metadata else {}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=peft.get_peft_model_state_dict(unet),
        text_encoder_lora_layers=peft.get_peft_model_state_dict(te), **meta)
    assert formats.detect(tmp_path)[0] == "diffusers"
    ref = copy.deepcopy(sd_pipe)
    ref.load_lora_weights(str(tmp_path))

    args, kwargs = unet_inputs()
    mu = ac.compile(sd_pipe.unet, str(tmp_path), lowering="eager")
    assert_close(sample(mu.merged_module(), args, kwargs), sample(ref.unet, args, kwargs), what="unet")
    mt = ac.compile(sd_pipe.text_encoder, str(tmp_path / "pytorch_lora_weights.safetensors"), lowering="eager")
    assert_close(text_out(mt.merged_module(), IDS), text_out(ref.text_encoder, IDS), what="text encoder")


def test_diffusers_lokr_file_equals_diffusers_load_lora_adapter(tmp_path):
    """LoKr in diffusers' layout on an SD3 transformer; diffusers infers the config from the shapes."""
    sd3 = tiny_sd3()
    pm = peft.get_peft_model(copy.deepcopy(sd3), peft.LoKrConfig(r=2, alpha=2, target_modules=ATTENTION,
                                                                 decompose_both=True))
    randomize_(pm, ("lokr_",), seed=8, scale=0.3)
    tensors = {f"transformer.{k.removeprefix('base_model.model.')}": v
               for k, v in peft.get_peft_model_state_dict(pm).items()}
    save_file(tensors, tmp_path / "lokr.safetensors")
    ref = copy.deepcopy(sd3)
    ref.load_lora_adapter(str(tmp_path / "lokr.safetensors"), prefix="transformer")
    m = ac.compile(sd3, str(tmp_path / "lokr.safetensors"), lowering="eager")
    args, kwargs = sd3_inputs()
    assert_close(sample(m.merged_module(), args, kwargs), sample(ref, args, kwargs), what="LoKr vs diffusers")


# -- saving ------------------------------------------------------------------------------------------
def _trained(model, spec, seed=9):
    m = ac.compile(model, spec, lowering="eager")
    randomize_(m, tuple(s for s in ("lora_", "hada_", "lokr_")), seed=seed, scale=0.3)
    return m


def test_saved_kohya_and_diffusers_files_load_in_diffusers(sd_pipe, tmp_path):
    """Ours -> kohya and -> diffusers' layout: diffusers' load_lora_weights gives our outputs."""
    unet, te = sd_pipe.unet, sd_pipe.text_encoder
    mu = _trained(unet, ac.LoRA(r=4, alpha=8, targets=ATTENTION + ["conv1"], rank_pattern={"conv1": 2},
                                alpha_pattern={"conv1": 3}))
    mt = _trained(te, ac.LoRA(r=2, alpha=4, targets=CLIP, rslora=True))
    args, kwargs = unet_inputs()
    want_unet, want_te = sample(mu.merged_module(), args, kwargs), text_out(mt.merged_module(), IDS)
    for fmt in ("kohya", "diffusers"):
        path = tmp_path / fmt / "both.safetensors"
        mu.save_adapter(tmp_path / fmt / "unet.safetensors", format=fmt)
        mt.save_adapter(tmp_path / fmt / "te.safetensors", format=fmt)
        # one file for the pipeline, as the tools share them
        save_file({**load_file(tmp_path / fmt / "unet.safetensors"), **load_file(tmp_path / fmt / "te.safetensors")},
                  path, metadata=_merged_metadata(tmp_path / fmt))
        ref = copy.deepcopy(sd_pipe)
        ref.load_lora_weights(str(path))
        assert_close(sample(ref.unet, args, kwargs), want_unet, what=f"{fmt}: unet in diffusers")
        assert_close(text_out(ref.text_encoder, IDS), want_te, what=f"{fmt}: text encoder in diffusers")
        back = ac.compile(unet, str(path), lowering="eager")
        assert_close(sample(back.merged_module(), args, kwargs), want_unet, what=f"{fmt}: ours -> ours")


@pytest.mark.parametrize("spec", [
    ac.LoRA(r=4, alpha=2, targets=ATTENTION, rank_pattern={"to_out.0": 2}, use_dora=True),
    ac.LoKr(r=2, alpha=3, targets=ATTENTION, decompose_both=True),
], ids=["lora-dora", "lokr"])
def test_saved_diffusers_file_loads_into_a_transformer_with_diffusers(spec, tmp_path):
    """`transformer.` keys and the config as metadata: diffusers' load_lora_adapter builds the same adapter."""
    sd3 = tiny_sd3()
    m = _trained(sd3, spec)
    m.save_adapter(tmp_path, format="diffusers")
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    ref = copy.deepcopy(sd3)
    ref.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    args, kwargs = sd3_inputs()
    want = sample(m.merged_module(), args, kwargs)
    assert_close(sample(ref, args, kwargs), want, what="diffusers loading our file")
    assert (want - sample(sd3, args, kwargs)).abs().max() > 1e-3


def _merged_metadata(folder) -> dict:
    from safetensors import safe_open

    merged = {}
    for f in ("unet.safetensors", "te.safetensors"):
        with safe_open(str(folder / f), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if "lora_adapter_metadata" in meta:
            merged.update(json.loads(meta["lora_adapter_metadata"]))
    return {"lora_adapter_metadata": json.dumps(merged)} if merged else {}


@pytest.mark.parametrize("spec", [
    ac.LoHa(r=2, alpha=3, targets=["to_q", "conv1"], rank_pattern={"conv1": 4}),
    ac.LoHa(r=2, alpha=3, targets=["conv1"], use_effective_conv2d=True),
    ac.LoKr(r=2, alpha=3, targets=["to_q", "conv1"]),
    ac.LoKr(r=16, alpha=5, targets=["to_q", "to_k"]),  # both factors full: the scale is baked into W1
    ac.LoRA(r=4, alpha=2, targets=["to_q", "to_v"], use_dora=True),
], ids=["loha", "loha-tucker", "lokr", "lokr-full", "dora"])
def test_kohya_round_trip(spec, tmp_path):
    unet = tiny_unet()
    m = _trained(unet, spec)
    m.save_adapter(tmp_path / "a.safetensors", format="kohya")
    file_sd = load_file(tmp_path / "a.safetensors")
    assert all(k.startswith("lora_unet_") for k in file_sd)
    args, kwargs = unet_inputs()
    want = sample(m.merged_module(), args, kwargs)
    if not getattr(spec, "use_dora", False):  # (lycoris_delta has no DoRA)
        assert_close(sample(lycoris_merged(unet, file_sd, "lora_unet"), args, kwargs), want, what="the file's own ΔW")
    back = ac.compile(unet, str(tmp_path / "a.safetensors"), lowering="eager")
    assert_close(sample(back.merged_module(), args, kwargs), want, what="round trip")


def test_save_refuses_what_a_format_cannot_hold(tmp_path):
    unet = tiny_unet()
    cases = [
        (ac.compile(unet, ac.OFT(r=0, oft_block_size=4, targets=["to_q"]), lowering="eager"), "kohya", {},
         ["OFT", "kohya/LyCORIS files hold LoRA, LoHa and LoKr"]),
        (ac.compile(unet, ac.LoHa(r=2, targets=["to_q"]), lowering="eager"), "diffusers", {},
         ["LoHa", "diffusers' loaders read LoRA"]),
        (ac.compile(unet, {"a": ac.LoRA(r=2, targets=["to_q"]), "b": ac.LoRA(r=2, targets=["to_v"])}, lowering="eager"),
         "kohya", {}, ["holds one adapter", "adapter_name="]),
        (ac.compile(unet, ac.LoRA(r=2, targets=["to_q"], modules_to_save=["conv_out"]), lowering="eager"), "diffusers",
         {}, ["modules_to_save"]),
        (ac.compile(unet, ac.LoRA(r=2, targets=["to_q"]), lowering="eager"), "onnx", {}, ["format='onnx'"]),
        (ac.compile(torch.nn.Sequential(torch.nn.Linear(4, 4)), ac.LoRA(r=2, targets=["0"]), lowering="eager"),
         "kohya", {}, ["component="]),
    ]
    for m, fmt, kw, needles in cases:
        with pytest.raises(AdapterError) as info:
            m.save_adapter(tmp_path / "x.safetensors", format=fmt, **kw)
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))
        assert not (tmp_path / "x.safetensors").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    m = _trained(tiny_text_encoder(), ac.LoRA(r=2, targets=["q_proj"]))
    path = tmp_path / "te.safetensors"
    m.save_adapter(path, format="kohya")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        next(iter(m.adapter_parameters())).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        m.save_adapter(path, format="kohya")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["te.safetensors"]


# -- inspect -------------------------------------------------------------------------------------------
def test_inspect_shows_a_files_format_method_ranks_and_targets(tmp_path, capsys):
    from adapt_compiler import cli

    te = tiny_text_encoder()
    sd = kohya_lora(te, "lora_te1_text_model", {"q_proj": (2, 1.0), "v_proj": (4, 2.0)}, seed=3)
    save_file(sd, tmp_path / "te.safetensors")
    assert cli.main(["inspect", "--adapter", str(tmp_path / "te.safetensors"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out and "'lora_te1' (text_encoder, 4 modules)" in out
    assert "method lora" in out and "ranks [2, 4]" in out and "alphas [1.0, 2.0]" in out
    factory = tmp_path / "build.py"
    factory.write_text("import sys\nsys.path.insert(0, %r)\nfrom diffusion_models import tiny_text_encoder\n"
                       "def build():\n    return tiny_text_encoder()\n" % str(__import__("pathlib").Path(__file__).parent))
    assert cli.main(["inspect", "--model", f"python:{factory}:build", "--adapter", str(tmp_path / "te.safetensors"),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out
    for layer in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.v_proj"):
        assert layer in out


# -- bad input -------------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before), "the model changed"


def test_keys_matching_no_module_list_close_names(tmp_path):
    te = tiny_text_encoder()
    sd = kohya_lora(te, "lora_te_text_model", {"q_proj": (2, 1.0)}, seed=0)
    bad = {k.replace("self_attn_q_proj", "self_atn_q_proj"): v for k, v in sd.items()}
    save_file(bad, tmp_path / "typo.safetensors")
    before = _state(te)
    m = ac.compile(te, ac.LoRA(r=2, targets=["v_proj"]), lowering="eager")
    with pytest.raises(AdapterError) as info:
        ac.compile(te, str(tmp_path / "typo.safetensors"), lowering="eager")
    msg = str(info.value)
    assert "match no layer of CLIPTextModel" in msg and "text_model_encoder_layers_0_self_atn_q_proj" in msg
    assert "close: encoder.layers.0.self_attn.q_proj" in msg
    with pytest.raises(AdapterError):
        m.load_adapter(str(tmp_path / "typo.safetensors"), "typo")
    assert list(m.state.specs) == ["default"] and len(m.adapter_parameters()) == 4  # nothing was added
    _assert_unchanged(te, before)


def test_a_file_mixing_formats_is_refused_by_name(tmp_path):
    te = tiny_text_encoder()
    sd = kohya_lora(te, "lora_te_text_model", {"q_proj": (2, 1.0)}, seed=0)
    sd["text_encoder.encoder.layers.0.self_attn.v_proj.lora_A.weight"] = torch.zeros(2, 16)
    save_file(sd, tmp_path / "mixed.safetensors")
    before = _state(te)
    with pytest.raises(CheckpointError, match=r"mixes formats: kohya .* diffusers"):
        ac.compile(te, str(tmp_path / "mixed.safetensors"), lowering="eager")
    _assert_unchanged(te, before)


BAD_FILES = {
    "locon-tucker": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_mid.weight": torch.zeros(2, 2)},
                     CheckpointError, ["lora_mid", "Tucker core", "no PEFT method"]),
    "lycoris-oft": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks": torch.zeros(2, 8, 8)},
                    CheckpointError, ["oft_blocks", "not PEFT's OFT"]),
    "up-without-down": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 2)},
                        CheckpointError, ["lacks lora_A", "incomplete"]),
    "two-methods": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16),
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 2),
                     "lora_te_text_model_encoder_layers_0_self_attn_v_proj.hada_w1_a": torch.zeros(16, 2),
                     "lora_te_text_model_encoder_layers_0_self_attn_v_proj.hada_w1_b": torch.zeros(2, 16),
                     "lora_te_text_model_encoder_layers_0_self_attn_v_proj.hada_w2_a": torch.zeros(16, 2),
                     "lora_te_text_model_encoder_layers_0_self_attn_v_proj.hada_w2_b": torch.zeros(2, 16)},
                    CheckpointError, ["mixes adapter methods", "lora", "loha"]),
    "input-axis-dora": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 2),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale": torch.ones(1, 16)},
                        CheckpointError, ["wd_on_out=False", "output channel"]),
    "wrong-rank-shapes": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16),
                           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 3)},
                          CheckpointError, ["shape mismatches", "q_proj.lora_B.weight"]),
    "peft-weights-without-config": ({"base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                     torch.zeros(2, 16)}, CheckpointError, ["without its config"]),
    "unknown-keys": ({"model.diffusion_model.input_blocks.1.weight": torch.zeros(2)}, CheckpointError,
                     ["not an adapter format", "lora_unet_"]),
    "wrong-component": (None, AdapterError, ["no 'unet' part", "text_encoder"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_single_files_are_refused_before_anything_is_created(case, tmp_path):
    tensors, exc, needles = BAD_FILES[case]
    te = tiny_text_encoder()
    if tensors is None:
        tensors = kohya_lora(te, "lora_te_text_model", {"q_proj": (2, 1.0)}, seed=0)
    save_file(tensors, tmp_path / "bad.safetensors")
    before = _state(te)
    m = ac.compile(te, ac.LoRA(r=2, targets=["v_proj"]), lowering="eager")
    kw = {"component": "unet"} if case == "wrong-component" else {}
    for load in (lambda: ac.compile(te, str(tmp_path / "bad.safetensors"), lowering="eager", **kw),
                 lambda: m.load_adapter(str(tmp_path / "bad.safetensors"), "x", **kw)):
        with pytest.raises(exc) as info:
            load()
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))
    assert list(m.state.specs) == ["default"]
    _assert_unchanged(te, before)


def test_pickles_are_refused(tmp_path):
    torch.save({"lora_te_x.lora_down.weight": torch.zeros(1)}, tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointError, match="pickle"):
        ac.compile(tiny_text_encoder(), str(tmp_path / "lora.ckpt"))


def test_two_text_encoder_parts_that_both_fit_need_component(tmp_path):
    te = tiny_text_encoder()
    sd = {**kohya_lora(te, "lora_te1_text_model", {"q_proj": (2, 1.0)}, seed=0),
          **kohya_lora(te, "lora_te2_text_model", {"q_proj": (2, 1.0)}, seed=1)}
    save_file(sd, tmp_path / "sdxl_te.safetensors")
    with pytest.raises(AdapterError, match="all fit CLIPTextModel; pass component="):
        ac.compile(te, str(tmp_path / "sdxl_te.safetensors"), lowering="eager")
    m = ac.compile(te, str(tmp_path / "sdxl_te.safetensors"), lowering="eager", component="text_encoder_2")
    assert torch.equal(m.adapter_state_dict()["base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight"],
                       sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"])


def test_hotswap_from_a_kohya_file(tmp_path):
    """Serving: another kohya file's weights into the compiled adapter in place (ranks and alphas may differ)."""
    te = tiny_text_encoder()
    first = kohya_lora(te, "lora_te_text_model", {"q_proj": (2, 2.0), "v_proj": (2, 2.0)}, seed=0)
    second = kohya_lora(te, "lora_te_text_model", {"q_proj": (2, 1.0), "v_proj": (2, 5.0)}, seed=1)
    save_file(first, tmp_path / "first.safetensors")
    save_file(second, tmp_path / "second.safetensors")
    m = ac.compile(te, str(tmp_path / "first.safetensors"), lowering="eager")
    live = list(m.adapter_parameters())
    m.load_adapter(str(tmp_path / "second.safetensors"), "default", hotswap=True)
    assert [id(p) for p in m.adapter_parameters()] == [id(p) for p in live]  # same tensors: nothing recompiles
    want = text_out(lycoris_merged(te, second, "lora_te_text_model"), IDS)
    assert_close(text_out(m.merged_module(), IDS), want, what="after hotswap")
