"""The test session's capture memo (capture_memo.py) gives what a fresh capture gives: a hit runs with
the new model's own tensors, and anything that changes the graph misses."""

from __future__ import annotations

import torch
from torch import nn

import capture_memo
from adapt_compiler.capture import capture
from models import tiny_llama, token_batch

memo_capture = capture_memo.memoised(capture)


def _run(captured, batch):
    return captured.graph_module(**batch)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def test_a_hit_runs_the_new_models_weights():
    batch = token_batch()
    first, second = tiny_llama(seed=0), tiny_llama(seed=1)  # same structure, different weights
    hits = capture_memo.STATS["hits"]
    memo_capture(first, (), batch, False)
    got = memo_capture(second, (), batch, False)
    assert capture_memo.STATS["hits"] == hits + 1
    with torch.no_grad():
        want = second.eval()(**batch).logits
        other = first.eval()(**batch).logits
        out = _logits(_run(got, batch))
    assert not torch.allclose(want, other)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_frozen_stand_ins_are_bound_by_name():
    batch = token_batch()
    model = tiny_llama(seed=2)
    memo_capture(model, (), batch, False)
    frozen = {n: nn.Parameter(t.detach() * 2, requires_grad=False) for n, t in model.named_parameters()}
    frozen.update(model.named_buffers())
    first = memo_capture(model, (), batch, False, frozen)  # the stand-ins' dtypes are in the key
    again = {n: nn.Parameter(t.detach().clone(), requires_grad=False) for n, t in frozen.items()
             if isinstance(t, nn.Parameter)}
    again.update(model.named_buffers())
    hits = capture_memo.STATS["hits"]
    got = memo_capture(model, (), batch, False, again)
    assert capture_memo.STATS["hits"] == hits + 1
    name = "model.layers.0.self_attn.q_proj.weight"
    assert got.graph_module.get_parameter(name) is again[name] and first.graph_module.get_parameter(name) is frozen[name]


def test_what_changes_the_graph_misses():
    batch = token_batch()
    model = tiny_llama(seed=3)
    memo_capture(model, (), batch, False)  # a hit or a miss, after the tests above
    misses = capture_memo.STATS["misses"]
    memo_capture(model, (), batch, True)  # another mode
    memo_capture(model, (), token_batch(batch=1), False)  # a size export specialises (1)
    model.config.use_cache = not model.config.use_cache  # a config value the forward reads
    memo_capture(model, (), batch, False)
    model.config._attn_implementation = "eager"  # a private one, which the config's JSON leaves out
    memo_capture(model, (), batch, False)
    assert capture_memo.STATS["misses"] == misses + 4


def test_a_class_is_keyed_by_identity_and_kept_alive():
    def make(sign):
        class Signed(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                return sign * self.lin(x)

        return Signed()

    x = torch.randn(2, 4)
    plus, minus = make(1.0), make(-1.0)
    memo_capture(plus, (x,), {}, False)
    got = memo_capture(minus, (x,), {}, False)  # same attributes, another class: a fresh capture
    with torch.no_grad():
        torch.testing.assert_close(got.graph_module(x), minus(x))


def _decode_call(model, cache_cls):
    """A one-token decode call over a cache filled by a 6-token prefill (the inputs generate() passes)."""
    from transformers import DynamicCache, StaticCache

    cache = DynamicCache(config=model.config) if cache_cls == "dynamic" else StaticCache(config=model.config,
                                                                                         max_cache_len=16)
    ids = token_batch(seq=6)["input_ids"]
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return {"input_ids": ids[:, -1:], "cache": cache, "position_ids": torch.full((2, 1), 6)}


def test_a_kv_cache_call_hits_by_the_caches_state_and_runs_the_new_models_weights():
    """A KV cache is a pytree node whose context is its Python state as plain JSON (transformers'
    exporter flatten): a second model's decode call with a cache in the same state hits and runs that
    model's weights; a cache of another kind or state misses."""
    first, second = tiny_llama(seed=4), tiny_llama(seed=5)
    first.config.use_cache = second.config.use_cache = True
    memo_capture(first, (), _decode_call(first, "dynamic"), False)
    hits, misses = capture_memo.STATS["hits"], capture_memo.STATS["misses"]
    call = _decode_call(second, "dynamic")
    got = memo_capture(second, (), call, False)
    assert capture_memo.STATS["hits"] == hits + 1
    with torch.no_grad():
        want = second(**_decode_call(second, "dynamic")).logits
        out = _logits(_run(got, call))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    memo_capture(second, (), _decode_call(second, "static"), False)  # another cache kind: another graph
    empty = {"input_ids": token_batch(seq=6)["input_ids"], "cache": _decode_call(second, "dynamic")["cache"]}
    empty["cache"].crop(0)  # layers initialised, no tokens: a prefill over an initialised cache
    memo_capture(second, (), empty, False)
    assert capture_memo.STATS["misses"] == misses + 2 and capture_memo.STATS["hits"] == hits + 1
