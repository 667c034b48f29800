"""Capturing calls that carry a transformers KV cache (`cache=DynamicCache | StaticCache | EncoderDecoderCache`).

`generate()` calls the model with `cache=<Cache>`; so can a user's own decoding loop. Capture
(torch.export, non-strict) takes such a call once the cache classes are pytree nodes, and this file
tells capture, through its extension point (`capture.InputRule`), how to treat the call:

* **pytree**: every `transformers.Cache` subclass is registered with transformers' own exporter
  flatten (`exporters.exporter_dynamo.register_pytree_node`): the tensors are the leaves, the rest of
  the object's state (layer types, `is_initialized`, EncoderDecoderCache's `is_updated`, ...) is the
  pytree context. The context is part of the structure key, so a graph is only ever called with the
  Python-side cache state it was traced with, and the cache a graph returns is rebuilt with the state
  the trace left (e.g. `is_updated=True` after T5's first decoder step).
* **dynamic dims**: a static cache's tensors (`is_compileable`: StaticCache) keep their shapes, so
  the decode graph has static shapes; a growing cache's KV tensors `[batch, heads, length, head_dim]`
  have dims 0 and 2 dynamic (the length grows by one per token: dims 0/1 would re-capture at every
  step). A 4-d attention mask (`[batch, 1, query, kv]`, what generate builds for static caches) has
  dims 0 and 2 dynamic (and 3 for a growing cache).
* **key**: prefill (a query longer than one token) and decode (one token) are separate graphs.

Python state that changes at every step is not replayable by a captured graph. Sliding-window layers
(`DynamicSlidingWindowLayer`, `StaticSlidingWindowLayer`) keep their length as a Python int, so the
structure key changes with every token: they still give correct tokens, by capturing once per step,
which is slow; `kv_cache_warning` says so once.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..capture import InputRule, register_input_rule

CACHE_ARGS = ("cache", "past_key_values")  # generate passes `cache=` (5.x); older callers past_key_values
QUERY_ARGS = ("input_ids", "decoder_input_ids", "inputs_embeds", "decoder_inputs_embeds")
_BUILTIN = (list, tuple, dict)


def cache_base():
    """transformers' Cache class, if transformers is imported (no Cache object can exist otherwise)."""
    mod = sys.modules.get("transformers.cache_utils")
    return getattr(mod, "Cache", None) if mod is not None else None


def is_cache(value) -> bool:
    base = cache_base()
    return base is not None and isinstance(value, base)


def cache_of(kwargs: dict):
    for name in CACHE_ARGS:
        if is_cache(kwargs.get(name)):
            return kwargs[name]
    return None


def is_static(cache) -> bool:
    """A cache whose tensors never change shape (StaticCache, and EncoderDecoderCache over two)."""
    return bool(getattr(cache, "is_compileable", False))


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def register_cache_pytrees() -> None:
    """Make every transformers Cache class a pytree node (idempotent; keeps an earlier registration)."""
    base = cache_base()
    if base is None:
        return
    from transformers.exporters.exporter_dynamo import register_pytree_node

    for cls in (base, *_subclasses(base)):
        if cls not in pytree.SUPPORTED_NODES:
            register_pytree_node(cls)


def _finds(args: tuple, kwargs: dict) -> bool:
    base = cache_base()
    if base is not None and base not in pytree.SUPPORTED_NODES:
        # before capture flattens the call: also a call without a cache may return one (a model built with
        # use_cache=True creates a DynamicCache in its forward), which export can only output as a pytree
        register_cache_pytrees()
    return cache_of(kwargs) is not None


def query_length(kwargs: dict) -> int | None:
    for name in QUERY_ARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    return None


def _key(args: tuple, kwargs: dict):
    cache = cache_of(kwargs)
    phase = "decode" if query_length(kwargs) == 1 else "prefill"
    return type(cache).__name__, "static" if is_static(cache) else "growing", phase


def _cache_spec(value, static: bool):
    """Export's dynamic_shapes for a cache: one spec per child of its registered flatten (a list)."""
    if isinstance(value, torch.Tensor):
        if static or value.dim() != 4:
            return None
        return {0: Dim.AUTO, 2: Dim.AUTO}  # [batch, heads, length, head_dim]
    if type(value) in _BUILTIN:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        out = {k: _cache_spec(v, static) for k, v in items}
        return out if isinstance(value, dict) else type(value)(out.values())
    node = pytree.SUPPORTED_NODES.get(type(value))
    if node is None:
        return None
    children, _ = node.flatten_fn(value)
    return [_cache_spec(c, static) for c in children]  # a list, even when empty (an empty cache)


def _dynamic_shapes(arguments: dict, default) -> dict:
    cache = cache_of(arguments) or cache_of(arguments.get("kwargs") or {})
    static = is_static(cache)
    _warn_if_per_step(cache)

    def spec(name, value):
        if is_cache(value):
            return _cache_spec(value, static)
        if "attention_mask" in name and isinstance(value, torch.Tensor) and value.dim() == 4:
            dims = {0: Dim.AUTO, 2: Dim.AUTO}  # [batch, 1, query, kv length]
            if not static:
                dims[3] = Dim.AUTO
            return dims
        if type(value) not in _BUILTIN and type(value) in pytree.SUPPORTED_NODES:  # e.g. encoder_outputs
            children, _ = pytree.SUPPORTED_NODES[type(value)].flatten_fn(value)
            return [spec(name, c) for c in children]
        if isinstance(value, dict):
            return {k: spec(k, v) for k, v in value.items()}
        return default(value)

    return {name: spec(name, value) for name, value in arguments.items()}


_WARNED: set = set()


def _warn_if_per_step(cache) -> None:
    layers = [*getattr(cache, "layers", ()),
              *getattr(getattr(cache, "self_attention_cache", None), "layers", ())]
    sliding = sorted({type(layer).__name__ for layer in layers if getattr(layer, "is_sliding", False)})
    if sliding and tuple(sliding) not in _WARNED:
        _WARNED.add(tuple(sliding))
        warnings.warn(
            f"adapt_compiler: the KV cache has sliding-window layers ({', '.join(sliding)}), which keep their "
            f"length as a Python int; every generated token is then a new capture (correct, but slow). For "
            f"prompts plus new tokens shorter than the window, build the model with config.sliding_window=None.",
            stacklevel=4,
        )


def _memo(args: tuple, kwargs: dict):
    """A static cache's decode steps: (id of the cache, the other inputs' shapes and values), the cache.
    Its Python state does not change between these steps (the tensors are updated in place), so the
    structure key is the same; sliding-window layers and a cross-attention cache not yet filled do."""
    if args:
        return None
    cache = cache_of(kwargs)
    if cache is None or not is_static(cache) or query_length(kwargs) != 1:
        return None
    layers = [*getattr(cache, "layers", ()),
              *(layer for part in ("self_attention_cache", "cross_attention_cache")
                for layer in getattr(getattr(cache, part, None), "layers", ()))]
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        return None
    if not all(getattr(cache, "is_updated", {0: True}).values()):
        return None
    parts = []
    for name, value in kwargs.items():
        if value is cache:
            continue
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, value))
        else:
            return None  # e.g. encoder_outputs: flattened the long way
    return (id(cache), tuple(parts)), (cache,)


KV_CACHE_RULE = InputRule("kv_cache", _finds, _key, _dynamic_shapes, flat=True, memo=_memo)
register_input_rule(KV_CACHE_RULE)
