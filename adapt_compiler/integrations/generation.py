"""`m.generate(...)`: Hugging Face generation through the adapted graphs, with a KV cache.

Why HF's GenerationMixin and not our own loop: generation is a large, model-specific API (greedy,
sampling, beam search, logits processors, stopping criteria, streamers, Whisper's long-form decoding,
...), and PEFT's tokens are exactly HF's tokens with the adapter in the forward. So the loop is HF's:
a small driver object (`_Driver`, a subclass of the model's own generation mixin, e.g.
`WhisperGenerationMixin`, or `GenerationMixin`) runs `generate`, and every forward it makes goes
to the AdaptedModule. The driver is not the AdaptedModule itself, so that

* the AdaptedModule keeps its own small namespace and `forward` (GenerationMixin brings ~100
  methods, and generate keeps per-call state such as `_previous_max_cache_length` on `self`);
* the driver can have the model's forward signature (generate inspects it) and override what
  generation decides that we decide instead: static caches are allocated before the first forward
  (the KV tensors must be graph inputs, not allocated inside a captured graph), their length is
  rounded up so a new prompt length reuses the compiled decode graph, and HF's own torch.compile of
  the forward is off (the graphs are compiled already);
* the user's model is never touched: the driver reads its config and attributes and delegates
  `prepare_inputs_for_generation` to it (both read-only).

Encoder-decoder models: `get_encoder()` returns an adapted encoder runner. It captures the model's
encoder through a view (`_SubmoduleView`) that shares the model's parameter dicts, so the encoder
graph has the model's own parameter names and the adapters on its layers are wired in as usual.

Per-sample adapters: `generate(..., adapter_names=[...])` gives each sequence its adapter (or
"__base__"). Generation repeats each row for beams / `num_return_sequences`; the names are repeated
the same way for the decoder, and the encoder sees the original rows, as in PEFT.

Everything a call could reject (names, generation arguments, cache types, a static cache too short
for the prompt) is checked in `_check` before generation starts.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import nn

from ..errors import AdapterError
from ..names import BASE_ADAPTER
from . import kv_cache

CACHE_BUCKET = 256  # static caches are sized in multiples of this (a new prompt length reuses the decode graph)
_DEFAULTS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False}
SUPPORTED_CACHES = ("DynamicCache", "StaticCache", "EncoderDecoderCache")
SUPPORTED_IMPLEMENTATIONS = (None, "dynamic", "static")


class GenerationSupport:
    """Mixin for AdaptedModule: `generate()` and `can_generate()` (expects `self.table`, `self._forward_at`)."""

    def can_generate(self) -> bool:
        model = self.table.model
        check = getattr(model, "can_generate", None)
        return bool(callable(check) and check())

    def generate(self, *args, adapter_names=None, **kwargs):
        """HF's `generate` with the adapters: same arguments and outputs as `model.generate`, plus
        `adapter_names=[...]` (one adapter name or "__base__" per input row)."""
        if not self.can_generate():
            raise AdapterError(
                f"generate(): {type(self.table.model).__name__} cannot generate (it is not a transformers model "
                f"with a language-modelling head); call the module instead."
            )
        driver = self.__dict__.get("_ac_driver")
        if driver is None:
            driver = _driver_class(type(self.table.model))(self)
            self.__dict__["_ac_driver"] = driver
        names = _check(driver, args, kwargs, adapter_names)
        with driver.serving(names):
            return driver.generate(*args, **kwargs)


# -- the driver ----------------------------------------------------------------------------------------
def _generation_bases(model_cls) -> tuple[type, ...]:
    """The model's own generation mixins (e.g. WhisperGenerationMixin), most derived first."""
    from transformers import GenerationMixin, PreTrainedModel

    own = [c for c in model_cls.__mro__
           if issubclass(c, GenerationMixin) and not issubclass(c, PreTrainedModel) and c is not GenerationMixin]
    return (*own, GenerationMixin)


_CLASSES: dict[type, type] = {}


def _driver_class(model_cls):
    """A driver class for one model class: the model's generation mixins plus `_Driver`, with the
    model's `forward` and `prepare_inputs_for_generation` signatures (generate inspects both)."""
    if model_cls not in _CLASSES:
        ns = {
            "forward": _with_signature(_Driver.forward, model_cls.forward),
            "prepare_inputs_for_generation": _with_signature(_Driver.prepare_inputs_for_generation,
                                                             model_cls.prepare_inputs_for_generation),
        }
        _CLASSES[model_cls] = type(f"AdaptedGenerator{model_cls.__name__}", (_Driver, *_generation_bases(model_cls)), ns)
    return _CLASSES[model_cls]


def _with_signature(fn, like):
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    wrapper.__signature__ = inspect.signature(like)
    wrapper.__name__ = fn.__name__
    return wrapper


class _Driver:
    """Runs HF's generate; every forward goes to the AdaptedModule (see the module docstring)."""

    def __init__(self, adapted):
        self.__dict__.update(_ac_adapted=adapted, _ac_model=adapted.table.model, _ac_names=None,
                             _ac_encoder=None, _ac_generation_config=None)

    # what generate reads: ours where it differs from the user's model, else the model's (read only)
    def __getattr__(self, name):
        if name.startswith("__") or name.startswith("_ac_"):
            raise AttributeError(name)
        return getattr(self.__dict__["_ac_model"], name)

    @property
    def config(self):
        return self._ac_model.config

    @property
    def generation_config(self):
        return self._ac_generation_config or self._ac_model.generation_config

    @generation_config.setter
    def generation_config(self, value):
        self.__dict__["_ac_generation_config"] = value  # never written into the user's model

    @property
    def device(self):
        return self._ac_adapted.device

    @property
    def dtype(self):
        return self._ac_adapted.dtype

    @property
    def main_input_name(self):
        return self._ac_adapted.main_input_name

    @property
    def training(self):
        return self._ac_adapted.training

    # -- forwards -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        kwargs = _drop_defaults(kwargs)
        root = ""  # the whole model
        if kwargs.get("encoder_outputs") is not None:  # the decoder's calls: the encoder does not run
            root = self._decoder_root()
        return self._ac_adapted._forward_at(root, args, kwargs, _names_for(self._ac_names, args, kwargs))

    def _decoder_root(self):
        # neither the encoder's layers nor, once cached, cross-attention's K/V projections run
        return ("decoder", self._ac_model, lambda fqn: False)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self._ac_model.prepare_inputs_for_generation(*args, **kwargs)

    def get_encoder(self, modality=None):
        if modality is not None:
            raise AdapterError(f"generate(): the {modality!r} encoder of multimodal models is not supported.")
        if self._ac_encoder is None:
            self.__dict__["_ac_encoder"] = _AdaptedEncoder(self)
        return self._ac_encoder

    @contextlib.contextmanager
    def serving(self, names):
        self.__dict__["_ac_names"] = names
        try:
            yield
        finally:
            self.__dict__["_ac_names"] = None

    # -- decisions generation leaves to the model, taken here --------------------------------------
    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        return False  # the adapted graphs are compiled already; HF would compile this driver's __call__

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:  # the user's static cache is allocated now too (and filled in place)
            rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
            self._allocate(user_cache, rows)
        if generation_config.cache_implementation == "static" and generation_config.max_cache_len is None:
            # a length per CACHE_BUCKET tokens, not per call: a new prompt length keeps the decode graph
            max_cache_length = CACHE_BUCKET * math.ceil(max_cache_length / CACHE_BUCKET)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                     max_cache_length)

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        cache = super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len, prefill_chunk_size,
                                              model_kwargs)
        self._allocate(cache, batch_size)
        return cache

    def _allocate(self, cache, batch_size: int) -> None:
        """Allocate a static cache's tensors now: a captured graph cannot allocate them for its caller
        (they would be new tensors inside the graph, and the caller's cache object would stay empty)."""
        for part in _static_parts(cache):
            if not all(layer.is_initialized for layer in part.layers):
                heads, head_dim = self._get_static_cache_init_shape()
                part.early_initialization(batch_size=batch_size, num_heads=heads, head_dim=head_dim,
                                          dtype=self.dtype, device=self.device)


def _static_parts(cache):
    parts = [getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)]
    parts = [p for p in parts if p is not None] or [cache]
    return [p for p in parts if kv_cache.is_static(p)]


def _drop_defaults(kwargs: dict) -> dict:
    """Arguments generate passes with their default value (they would land in the forward's **kwargs,
    which torch 2.13's export cannot bind together with dynamic shapes)."""
    return {k: v for k, v in kwargs.items() if not (k in _DEFAULTS and v == _DEFAULTS[k])}


def _batch_of(args, kwargs) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    out = getattr(kwargs.get("encoder_outputs"), "last_hidden_state", None)
    return int(out.shape[0]) if out is not None else None


def _names_for(names, args, kwargs):
    """`names` (one per input row) for a forward of `batch` rows: generate repeats each row for beams
    and num_return_sequences (repeat_interleave), so each name is repeated the same way."""
    if names is None:
        return None
    batch = _batch_of(args, kwargs)
    if batch is None or batch == len(names):
        return list(names)
    return [n for n in names for _ in range(batch // len(names))]


# -- the encoder of encoder-decoder models ----------------------------------------------------------------
class _SubmoduleView(nn.Module):
    """Calls one submodule of the model while exposing the whole model's parameter names: it shares the
    model's parameter/buffer/module dicts (read only), so a capture of it has the model's FQNs."""

    def __init__(self, model: nn.Module, path: str):
        super().__init__()
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            self.__dict__[name] = model.__dict__[name]
        self.__dict__["_ac_path"] = path

    def forward(self, *args, **kwargs):
        return self.get_submodule(self._ac_path)(*args, **kwargs)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise AdapterError(f"generate(): {type(module).__name__} (the model's encoder) is not a submodule of the model.")


class _AdaptedEncoder:
    """What generate calls as the encoder: the encoder's signature, run through the adapted graph."""

    def __init__(self, driver: _Driver):
        model = driver._ac_model
        encoder = model.get_encoder()
        path = _path_of(model, encoder)
        self.driver = driver
        self.main_input_name = getattr(encoder, "main_input_name", driver.main_input_name)
        view_cls = type(f"Adapted{type(encoder).__name__}", (_SubmoduleView,),
                        {"forward": _with_signature(_SubmoduleView.forward, type(encoder).forward)})
        self.root = (f"encoder:{path}", view_cls(model, path), lambda fqn: fqn.startswith(path + "."))
        self.forward = _with_signature(lambda *a, **k: None, encoder.forward)  # generate reads the signature

    def __call__(self, *args, **kwargs):
        kwargs = _drop_defaults(kwargs)
        names = _names_for(self.driver._ac_names, args, kwargs)
        return self.driver._ac_adapted._forward_at(self.root, args, kwargs, names)


# -- checks before anything runs ------------------------------------------------------------------------
def _check(driver, args, kwargs, adapter_names):
    """Validate one generate call; AdapterError naming the argument, before any state changes."""
    gen_kwargs = dict(kwargs)
    config_obj = gen_kwargs.pop("generation_config", None)
    for name in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                 "negative_prompt_ids", "negative_prompt_attention_mask"):
        gen_kwargs.pop(name, None)
    streamer = gen_kwargs.pop("streamer", None)
    for name in ("assistant_model", "custom_generate"):
        if kwargs.get(name) is not None:
            raise AdapterError(f"generate(): {name}= is not supported with adapt_compiler (it runs another model or "
                               f"another loop); drop it.")
    _check_cache_objects(kwargs)
    try:
        mode_kwargs = driver._extract_generation_mode_kwargs(None, gen_kwargs, None, None, streamer)
        config, model_kwargs = driver._prepare_generation_config(config_obj, **gen_kwargs)
        config.validate()  # HF's own check: raises for invalid settings, warns for ignored ones
        driver._validate_model_kwargs(dict(model_kwargs))
        driver._validate_generation_mode(config.get_generation_mode(None), config, mode_kwargs)
    except AdapterError:
        raise
    except (ValueError, TypeError) as err:
        raise AdapterError(f"generate(): {err}") from err
    _check_cache(config, kwargs)
    batch = _prompt_batch(driver, args, kwargs)
    _check_static_length(config, kwargs, args, driver)
    if adapter_names is None:
        return None
    adapted = driver._ac_adapted
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise AdapterError(f"generate(): adapter_names must be a list with one adapter name per input row, "
                           f"got {type(adapter_names).__name__}.")
    known = adapted.adapter_names_known()
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known}, key=str)
    if unknown:
        raise AdapterError(f"generate(): adapter_names has unknown adapter(s) {unknown}; known: {sorted(known)} "
                           f"(or {BASE_ADAPTER!r}).")
    if batch is not None and len(adapter_names) != batch:
        raise AdapterError(f"generate(): adapter_names has {len(adapter_names)} names for {batch} input rows; give "
                           f"one name per row.")
    if adapted.merged:
        raise AdapterError("generate(): adapter_names needs unmerged adapters; call m.unmerge() first.")
    return list(adapter_names)


def _prompt_batch(driver, args, kwargs) -> int | None:
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get(driver.main_input_name, kwargs.get("input_ids")))
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    return _batch_of((), {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})


def _check_cache(config, kwargs) -> None:
    impl = config.cache_implementation
    if impl is not None and not config.use_cache:
        raise AdapterError(f"generate(): cache_implementation={impl!r} needs use_cache=True (the model's generation "
                           f"config has use_cache=False, so no cache would be used); pass use_cache=True.")
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise AdapterError(f"generate(): cache_implementation={impl!r} is not supported; use one of "
                           f"{[i for i in SUPPORTED_IMPLEMENTATIONS if i]} (or leave it unset for a DynamicCache).")


def _check_cache_objects(kwargs) -> None:
    for name in ("past_key_values", "cache"):
        cache = kwargs.get(name)
        if cache is None:
            continue
        if not kv_cache.is_cache(cache):
            raise AdapterError(f"generate(): {name}= must be a transformers Cache ({', '.join(SUPPORTED_CACHES)}), "
                               f"got {type(cache).__name__}.")
        kinds = {type(cache).__name__, *(type(p).__name__ for p in (getattr(cache, "self_attention_cache", None),
                                                                      getattr(cache, "cross_attention_cache", None))
                                          if p is not None)}
        bad = sorted(kinds - set(SUPPORTED_CACHES))
        if bad:
            raise AdapterError(f"generate(): {name}= is a {', '.join(bad)}, which adapt_compiler cannot capture; "
                               f"use one of {', '.join(SUPPORTED_CACHES)}.")


def _check_static_length(config, kwargs, args, driver) -> None:
    """A user-given static cache must hold the prompt and the new tokens (else an index error mid-way)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    parts = _static_parts(cache) if cache is not None else []
    if not parts:
        return
    limit = int(parts[0].get_max_length())
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
    prompt = int(inputs.shape[-1]) if isinstance(inputs, torch.Tensor) and not driver.config.is_encoder_decoder else 1
    past = int(parts[0].get_seq_length())
    total = prompt + (config.max_new_tokens if config.max_new_tokens is not None else max(config.max_length - prompt, 0))
    if past + prompt > limit:
        raise AdapterError(f"generate(): the prompt has {prompt} tokens but the static cache holds at most {limit} "
                           f"(max_cache_len={limit}, {past} already used); use a longer cache.")
    if past + total > limit:
        raise AdapterError(f"generate(): {prompt} prompt tokens + {total - prompt} new tokens exceed the static "
                           f"cache's max_cache_len={limit}; use a longer cache or fewer max_new_tokens.")
