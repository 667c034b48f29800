"""The architecture matrix (issue 20): LoRA with default targets (`targets=None`) and with
`targets="all-linear"` on tiny random-weight configs of 22 `transformers` architectures: decoder-only,
encoder-only, encoder-decoder, vision, audio, multimodal and MoE.

Each row compiles (eager lowering), trains one step, and equals PEFT on the same adapter directory:
ours saved -> PeftModel.from_pretrained gives our outputs and our adapter gradients; and where PEFT
has its own default for the model type, PEFT's get_peft_model adapts exactly the layers we adapt and
its saved directory loads here with its outputs. Where PEFT has no default (CLIP, Whisper, Llava,
Phi3, ViT, ...), ours still picks each attention's query and value projections from the graph (Llava:
in both towers, since the example input built from its config carries an image).
One row runs through the default (inductor) lowering.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.default_targets import peft_default
from oracle import assert_close, compare_grads, logits_of, randomize_

tf = pytest.importorskip("transformers")

_ATTN = dict(num_attention_heads=2)
_DEC = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_key_value_heads=1,
            max_position_embeddings=64, use_cache=False, **_ATTN)


def _ids(batch=2, seq=6, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _text(vocab=96, **extra):
    return lambda: {"input_ids": _ids(vocab=vocab), **extra}


def _enc_dec(vocab=96):
    return lambda: {"input_ids": _ids(vocab=vocab), "decoder_input_ids": _ids(seq=4, vocab=vocab, seed=2)}


def _pixels(size=16, channels=3, seed=3):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _llava(strategy="default", vision=None):
    vision = vision or tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=32)
    text = tf.LlamaConfig(**_DEC)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=95, vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu", use_cache=False)
    return tf.LlavaForConditionalGeneration(cfg)


def _llava_batch():
    ids = _ids(seq=8, vocab=90)
    ids[:, 1:5] = 95  # 4 image tokens: a 16×16 image in 8×8 patches
    return {"input_ids": ids, "pixel_values": _pixels()}


# name -> (build the model, build the batch)
ARCHS = {
    # decoder-only
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC)), _text()),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DEC)), _text()),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_DEC, head_dim=16)), _text()),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DEC)), _text()),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_DEC, head_dim=16)), _text()),
    "gemma3_text": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_DEC, head_dim=16)), _text()),
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_DEC, pad_token_id=0)), _text()),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96, n_positions=64,
                                                      use_cache=False)), _text()),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                                num_hidden_layers=1, use_cache=False, **_ATTN)), _text()),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                                   word_embed_proj_dim=32, max_position_embeddings=64,
                                                   use_cache=False, **_ATTN)), _text()),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=2,
                                                         use_cache=False)), _text()),
    "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                            use_cache=False, **_ATTN)), _text()),
    # MoE
    "mixtral": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2)),
                _text()),
    # encoder-only
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                                    intermediate_size=48, **_ATTN)), _text()),
    "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, intermediate_size=48, pad_token_id=1, **_ATTN)), _text()),
    "distilbert": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=96, dim=32, n_layers=1, n_heads=2, hidden_dim=48)), _text()),
    # encoder-decoder
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        use_cache=False)), _enc_dec()),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=48, num_layers=1,
                                                             num_heads=2, use_cache=False)), _enc_dec()),
    # vision
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=48,
                                                               image_size=16, patch_size=8, num_labels=3, **_ATTN)),
            lambda: {"pixel_values": _pixels()}),
    # multimodal
    "clip": (lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         max_position_embeddings=16, **_ATTN),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, image_size=16, patch_size=8,
                           **_ATTN), projection_dim=16)),
             lambda: {"input_ids": _ids(), "pixel_values": _pixels()}),
    "llava": (_llava, _llava_batch),
    # audio
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
        max_source_positions=8, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, use_cache=False)),
        lambda: {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4)),
                 "decoder_input_ids": _ids(seq=4, seed=2)}),
}


def _output(out):
    """The tensor a row compares: logits, or CLIP's image-text similarity."""
    return out.logits_per_image if hasattr(out, "logits_per_image") else logits_of(out)


def _loss(out):
    return _output(out).square().mean()


def _adapted(peft_model) -> set[str]:
    """The layers (and parameters) PEFT put a LoRA adapter on, by our FQN (without PEFT's wrapper prefix)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    out = set()
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            fqn = name.replace(".base_layer", "")
            out.add(f"{fqn}.{mod.parameter_name}" if isinstance(mod, ParamWrapper) else fqn)
    return out


def _ours_adapted(m) -> set[str]:
    return {s.layer.fqn for s in m.table.slots.values()}


# the rows run by default (about 15 s each on 2 busy cores); the other 16 are marked slow (`-m slow`, ~10 min)
# Falcon: the x @ W.T + b regression; Llava: the vision tower runs in the default-target capture
FAST = {"falcon", "t5", "vit", "mixtral", "whisper", "llava"}


@pytest.fixture(scope="module", params=[a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
                                        for a in sorted(ARCHS)])
def arch(request):
    build, batch = ARCHS[request.param]
    torch.manual_seed(0)
    return request.param, build().eval(), batch()


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_on_architecture(arch, targets, tmp_path):
    import peft

    name, base, batch = arch
    with torch.no_grad():
        want_base = _output(base(**batch))
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=targets), lowering="eager")
    spec = m.state.specs["default"]
    assert spec.targets is not None  # resolved before the adapter was created, so the saved config names them
    randomize_(m, ("lora_",), seed=5, scale=0.2)
    out = m(**batch)
    assert not torch.allclose(_output(out), want_base)  # the adapter does something
    with torch.no_grad():
        assert_close(_output(base(**batch)), want_base, what="the user's model is untouched")

    # ours -> PEFT: the same outputs and adapter gradients
    m.save_adapter(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
    theirs = pm(**batch)
    assert_close(_output(out), _output(theirs), what=f"{name}: ours -> PeftModel.from_pretrained")
    assert _adapted(pm) == _ours_adapted(m)
    _loss(out).backward()
    _loss(theirs).backward()
    compare_grads(m, pm, rtol=1e-4, atol=1e-6)

    # PEFT's own choice of layers, where PEFT has one, and its directory loaded here
    if targets is None and peft_default("lora", base.config.model_type) is None:
        picked = {f.rsplit(".", 1)[-1] for f in _ours_adapted(m)}  # each attention's query and value projections
        assert picked in ({"q_proj", "v_proj"}, {"query", "value"}, {"q", "v"}, {"qkv_proj"}, {"query_key_value"},
                          {"q_lin", "v_lin"}), picked
        if name == "llava":  # both towers: the example input built from the config carries an image
            assert {f.split(".layers.")[0] for f in _ours_adapted(m)} == {"model.vision_tower.encoder",
                                                                         "model.language_model"}
            with pytest.raises(ValueError, match="target_modules"):  # PEFT itself has no default for llava
                peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8))
    else:
        peft_targets = targets
        if targets is None and name == "mixtral":  # PEFT 0.21.2 raises NoMatchingPeftModuleError on its own
            peft_targets = peft_default("lora", "mixtral")  # default for transformers-5 Mixtral; its table's entry
        pm2 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets))
        pm2.eval()
        assert _adapted(pm2) == _ours_adapted(m)
        randomize_(pm2, ("lora_",), seed=6, scale=0.2)
        pm2.save_pretrained(tmp_path / "peft")
        m2 = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
        with torch.no_grad():
            assert_close(_output(m2(**batch)), _output(pm2(**batch)), what=f"{name}: PEFT dir -> ours")

    # one training step moves the output
    torch.optim.SGD(m.adapter_parameters(), lr=1.0).step()
    with torch.no_grad():
        assert not torch.equal(_output(m(**batch)), _output(out))


def test_default_lowering_row():
    """The one inductor row: Qwen3 with default targets, a training step compiled by Inductor."""
    build, batch_of = ARCHS["qwen3"]
    torch.manual_seed(0)
    base, batch = build().eval(), batch_of()
    m = ac.compile(base, ac.LoRA(r=4, alpha=8))
    eager = ac.compile(base, ac.LoRA(r=4, alpha=8), lowering="eager")
    randomize_(m, ("lora_",), seed=5, scale=0.2)
    eager.load_state_dict(m.state_dict())
    out, want = m(**batch), eager(**batch)
    assert_close(_output(out), _output(want), rtol=1e-4, atol=1e-5)
    _loss(out).backward()
    _loss(want).backward()
    for (k, p), (k2, q) in zip(sorted(m.named_parameters()), sorted(eager.named_parameters())):
        if p.requires_grad:
            assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, what=f"grad {k}")


@pytest.mark.parametrize("strategy, tower", [("default", "clip"), ("full", "clip"), ("full", "siglip")])
def test_llava_example_input_fills_the_image_tokens(strategy, tower):
    """The config-built example input of a Llava model holds exactly as many image tokens as the vision
    tower yields features (with or without a class token), so the model runs on it and the capture
    for default targets sees the vision tower."""
    from adapt_compiler.example_inputs import example_inputs

    vision = None if tower == "clip" else tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    base = _llava(strategy, vision).eval()
    _, kw = example_inputs(base)
    per_image = 4 + (tower == "clip") - (strategy == "default")
    assert (kw["input_ids"] == 95).sum(1).tolist() == [per_image] * kw["pixel_values"].shape[0]
    with torch.no_grad():
        base(**kw)  # transformers checks that image features and image tokens match
