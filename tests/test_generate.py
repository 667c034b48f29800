"""`m.generate(...)`: HF's generation API over the adapted graphs, against PEFT's `generate`.

Eager lowering (the captures are what is under test here; the compiled decode step is in
test_generate_compiled.py). Every comparison is with the same adapter weights loaded into PEFT,
tokens and per-step scores, with a left-padded batch, and with both a DynamicCache and a
StaticCache (`cache_implementation="static"`).
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from adapt_compiler.errors import AdapterError
from models import (tiny_bart, tiny_gemma, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, tiny_t5,
                    tiny_whisper)
from oracle import ours_from_peft, peft_twin, randomize_

CACHES = (None, "static")  # None: generate's default DynamicCache
ATTN = ["q_proj", "v_proj"]
ARCHS = {  # name: (factory, LoRA targets, encoder-decoder)
    "llama": (lambda: tiny_llama(layers=1), ATTN, False),
    "gpt2": (tiny_gpt2, ["c_attn"], False),
    "qwen2": (tiny_qwen2, ATTN, False),
    "mistral": (lambda: tiny_mistral(sliding_window=None), ATTN, False),
    "gemma": (tiny_gemma, ATTN, False),
    "t5": (tiny_t5, ["q", "v"], True),
    "bart": (tiny_bart, ATTN, True),
    "whisper": (tiny_whisper, ATTN, True),
}


def prompts(rows: int = 2, length: int = 6, padded: bool = True, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if padded and rows > 1:
        mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(name: str) -> dict:
    if name == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))}
    return prompts()


def greedy(cache, **kw) -> dict:
    return dict(max_new_tokens=4, do_sample=False, use_cache=True, cache_implementation=cache, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True, **kw)


def assert_same_generation(ours, theirs, what: str) -> None:
    assert torch.equal(ours.sequences, theirs.sequences), f"{what}: tokens {ours.sequences} vs {theirs.sequences}"
    assert len(ours.scores) == len(theirs.scores)
    for i, (a, b) in enumerate(zip(ours.scores, theirs.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{what}: scores of step {i}")


def scores_differ(a, b) -> bool:
    return any((x - y).abs().max() > 1e-3 for x, y in zip(a.scores, b.scores))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_equals_peft(arch):
    factory, targets, enc_dec = ARCHS[arch]
    base = factory()
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_(pm, ("lora_",), scale=0.3)
    m = ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=targets))
    inputs = inputs_for(arch)
    for cache in CACHES:
        ours = m.generate(**inputs, **greedy(cache))
        assert_same_generation(ours, pm.generate(**inputs, **greedy(cache)), f"{arch}, cache={cache}")
        with torch.no_grad():
            plain = base.generate(**inputs, **greedy(cache))
        assert scores_differ(ours, plain), "the adapter changes the scores"
    if enc_dec:  # the encoder ran through its own adapted graph (the model's FQNs)
        assert any(key[0].startswith("encoder:") for key in m._graphs)  # (root, training, signature)


@pytest.mark.parametrize("method", ["loha", "oft", "llama_adapter"])
def test_generate_other_method_families_equal_peft(method):
    """One method per family: additive (LoHa), orthogonal (OFT), graph-level (Llama-Adapter, whose
    gated prompt attention sits in the cached decode path)."""
    base = tiny_llama(layers=2)
    configs = {
        "loha": (peft.LoHaConfig(r=4, alpha=8, target_modules=ATTN), ac.LoHa(r=4, alpha=8, targets=ATTN), "hada_"),
        "oft": (peft.OFTConfig(oft_block_size=16, r=0, target_modules=ATTN), ac.OFT(oft_block_size=16, targets=ATTN),
                "oft_"),
        "llama_adapter": (peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"),
                          ac.LlamaAdapter(adapter_len=4, adapter_layers=1), "adaption_"),
    }
    peft_cfg, spec, key = configs[method]
    pm = peft_twin(base, peft_cfg)
    randomize_(pm, (key,), scale=0.5)
    m = ours_from_peft(base, pm, spec)
    inputs = prompts()
    for cache in CACHES:
        ours = m.generate(**inputs, **greedy(cache))
        assert_same_generation(ours, pm.generate(**inputs, **greedy(cache)), f"{method}, cache={cache}")
        with torch.no_grad():
            assert scores_differ(ours, base.generate(**inputs, **greedy(cache)))


@pytest.fixture(scope="module")
def lora_pair():
    base = tiny_llama(layers=1)
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    randomize_(pm, ("lora_",), scale=0.3)
    return base, pm, ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=ATTN))


@pytest.mark.parametrize("mode", [
    dict(do_sample=True, top_k=20, temperature=0.9),
    dict(do_sample=True, num_return_sequences=2),
    dict(num_beams=3, num_return_sequences=2),
])
def test_generation_modes_equal_peft(lora_pair, mode):
    _, pm, m = lora_pair
    inputs = prompts()
    kw = dict(max_new_tokens=4, use_cache=True, pad_token_id=0, **mode)
    torch.manual_seed(5)
    ours = m.generate(**inputs, **kw)
    torch.manual_seed(5)
    theirs = pm.generate(**inputs, **kw)
    assert torch.equal(ours, theirs)
    assert ours.shape[0] == 2 * mode.get("num_return_sequences", 1)


class _Recorder(BaseStreamer):
    def __init__(self):
        self.got = []

    def put(self, value):
        self.got.append(value.tolist())

    def end(self):
        self.got.append("end")


def test_streamer_and_eos_equal_peft(lora_pair):
    _, pm, m = lora_pair
    ids = prompts(rows=1)["input_ids"]
    ours, theirs = _Recorder(), _Recorder()
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    m.generate(input_ids=ids, streamer=ours, **kw)
    pm.generate(input_ids=ids, streamer=theirs, **kw)
    assert ours.got == theirs.got and ours.got[-1] == "end" and len(ours.got) == 6  # prompt, 4 tokens, end
    full = m.generate(input_ids=ids, **kw)
    eos = int(full[0, ids.shape[1] + 1])  # the second new token
    stopped = m.generate(input_ids=ids, eos_token_id=eos, **kw)
    assert torch.equal(stopped, pm.generate(input_ids=ids, eos_token_id=eos, **kw))
    assert stopped.shape[1] == ids.shape[1] + 2 and int(stopped[0, -1]) == eos


def test_user_given_caches(lora_pair):
    base, pm, m = lora_pair
    inputs = prompts(rows=1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True)
    want = pm.generate(**inputs, **kw)
    for make in (lambda: DynamicCache(config=base.config), lambda: StaticCache(config=base.config, max_cache_len=32)):
        ours = m.generate(**inputs, cache=make(), **kw)
        assert torch.equal(ours, pm.generate(**inputs, cache=make(), **kw))
        assert torch.equal(ours, want)


# -- per-sample adapters ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters():
    base = tiny_llama(layers=1)
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN), adapter_name="math")
    pm.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]))
    randomize_(pm, ("lora_",), scale=0.4)
    m = ac.compile(base, {"math": ac.LoRA(r=4, alpha=8, targets=ATTN),
                          "code": ac.LoRA(r=2, alpha=4, targets=["v_proj", "o_proj"])}, lowering="eager")
    for name in ("math", "code"):
        m.load_adapter_state_dict(get_peft_model_state_dict(pm, adapter_name=name), name)
    return m, pm


NAMES = ["math", "__base__", "code"]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names_equals_peft(two_adapters, cache, beams):
    m, pm = two_adapters
    inputs = prompts(rows=3)
    kw = greedy(cache, num_beams=beams)
    ours = m.generate(**inputs, adapter_names=NAMES, **kw)
    assert_same_generation(ours, pm.generate(**inputs, adapter_names=NAMES, **kw), f"adapter_names, {cache}")
    if beams == 1:  # and each row is what its own adapter generates
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with m.disable_adapters():
                    row = m.generate(**inputs, **kw).sequences[i]
            else:
                m.set_adapter(name)
                row = m.generate(**inputs, **kw).sequences[i]
            assert torch.equal(ours.sequences[i], row), name
        m.set_adapter("math")


# -- bad input: an AdapterError naming the argument, before anything changes -----------------------------
def _state(m):
    return COUNTERS["captures"], len(m._graphs), m.active_adapters, m.adapters_enabled


@pytest.mark.parametrize("call, match", [
    (lambda m, b: m.generate(**b, adapter_names=["math"]), "adapter_names has 1 names for 2 input rows"),
    (lambda m, b: m.generate(**b, adapter_names=["math", "nope"]), r"unknown adapter\(s\) \['nope'\]"),
    (lambda m, b: m.generate(**b, adapter_names="math"), "adapter_names must be a list"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, not_an_argument=3), "not_an_argument"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, num_beams=2, streamer=_Recorder()), "streamer"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, use_cache=True, cache_implementation="offloaded"),
     "cache_implementation='offloaded'"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, cache_implementation="static"), "needs use_cache=True"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, cache=((torch.zeros(1),),)), "cache= must be a transformers"),
    (lambda m, b: m.generate(**b, max_new_tokens=2, past_key_values=[1, 2]), "past_key_values= must be"),
])
def test_bad_generate_input_is_refused_before_anything_runs(two_adapters, call, match):
    m, _ = two_adapters
    batch = prompts()
    before = _state(m)
    with pytest.raises(AdapterError, match=match):
        call(m, batch)
    assert _state(m) == before


def test_prompt_longer_than_a_static_cache_is_refused_with_the_limit(two_adapters):
    m, _ = two_adapters
    config = m.config
    batch = prompts(rows=2, length=6)
    before = _state(m)
    with pytest.raises(AdapterError, match="max_cache_len=4"):
        m.generate(**batch, max_new_tokens=2, cache=StaticCache(config=config, max_cache_len=4))
    with pytest.raises(AdapterError, match="6 prompt tokens \\+ 5 new tokens exceed the static cache's max_cache_len=8"):
        m.generate(**batch, max_new_tokens=5, cache=StaticCache(config=config, max_cache_len=8))
    assert _state(m) == before


def test_plain_calls_of_a_use_cache_model_train_and_return_the_cache():
    """A model built with use_cache=True (the HF default) creates a DynamicCache in its forward: a plain
    training call captures, returns that cache, and its loss and gradients equal PEFT's."""
    from oracle import compare_grads

    base = tiny_llama(layers=1)
    base.config.use_cache = True
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    randomize_(pm, ("lora_",), seed=3, scale=0.4)
    m = ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=ATTN)).train()
    pm.train()
    batch = prompts(padded=False)
    ours, theirs = m(**batch, labels=batch["input_ids"]), pm(**batch, labels=batch["input_ids"])
    assert isinstance(ours.past_key_values, DynamicCache)
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.past_key_values.layers[0].values, theirs.past_key_values.layers[0].values)
    ours.loss.backward()
    theirs.loss.backward()
    compare_grads(m, pm)
