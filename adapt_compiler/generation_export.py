"""Deploying generation: a prefill and a decode program over a static KV cache, in one AOTInductor .pt2.

    progs = ac.export(m, kwargs={"input_ids": ids}, generate=True, max_cache_len=256)  # GenerationPrograms
    ac.package(progs, "gen.pt2")          # two AOTInductor models, "prefill" and "decode", one file
    python examples/generate_runner.py gen.pt2 --prompt-ids 5,7,9     # torch only

Both programs are the adapted graphs of the calls `generate(cache_implementation="static")` makes
(captured like any call, lowering/step.py's flat form), and take flat tensors, positionally:

    input_ids       [B, T]   prefill: 2 <= T <= L (dynamic); decode: T = 1
    attention_mask  [B, L]   1 where a cache position holds a real token (left padding: 0)
    position_ids    [B, T]   as generate computes them (cumsum of the mask - 1)
    cache tensors            per layer keys [B, H, L, D], values [B, H, L, D], cumulative_length [] int64:
                             the caller allocates them (zeros) and the programs update them in place

and return the last position's logits [B, 1, vocab]. B and L = max_cache_len are fixed at export.
The package metadata (`runner.get_metadata()["ac_generation"]`, JSON) lists the inputs, the cache
tensors' shapes and dtypes, B and L, so a runner needs neither this library nor transformers.

merge=False (the default here): the adapter tensors stay separate constants under the names
`adapter_constants(m, name, as_name=...)` uses, so `load_constants(..., check_full_update=False)` on
both models swaps the adapter without recompiling. merge=True folds the active adapters in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import Dim

from .pipeline import capture  # capture.capture, never during a background compile (lowering/auto.py)
from .errors import ExportError
from .lowering.auto import no_background_compile
from .export import _atomic_path, _check_module, _eval_mode, _snapshot, _target, is_unmerged
from .integrations.generation import CACHE_BUCKET
from .lowering.step import FlatStep

META_KEY = "ac_generation"


@dataclass
class GenerationPrograms:
    """The exported prefill and decode programs and what a runner needs to drive them."""

    prefill: torch.export.ExportedProgram
    decode: torch.export.ExportedProgram
    metadata: dict = field(default_factory=dict)

    @property
    def programs(self) -> dict:
        return {"prefill": self.prefill, "decode": self.decode}


def _static_cache(m, batch: int, length: int):
    from transformers import StaticCache
    from transformers.configuration_utils import get_head_shapes

    config = m.config.get_text_config(decoder=True)
    cache = StaticCache(config=config, max_cache_len=length)
    heads, head_dim = get_head_shapes(config)
    cache.early_initialization(batch_size=batch, num_heads=heads, head_dim=head_dim, dtype=m.dtype, device=m.device)
    return cache


def _positions(mask2d: torch.Tensor) -> torch.Tensor:
    """generate's position ids from a 2-d mask: cumsum - 1, padding positions at 1."""
    pos = mask2d.long().cumsum(-1) - 1
    return pos.masked_fill(mask2d == 0, 1)


def _phase_inputs(cache, ids: torch.Tensor, mask: torch.Tensor, length: int, decode: bool) -> dict:
    batch, prompt = ids.shape
    full = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
    full[:, :prompt] = mask
    if decode:
        full[:, prompt] = 1
        # contiguous copies: AOTInductor compiles for the example inputs' strides, and a runner passes fresh tensors
        return dict(input_ids=ids[:, -1:].contiguous(), attention_mask=full,
                    position_ids=_positions(full[:, :prompt + 1])[:, -1:].contiguous(), cache=cache, use_cache=True,
                    logits_to_keep=1)
    return dict(input_ids=ids.contiguous(), attention_mask=full, position_ids=_positions(mask), cache=cache, use_cache=True,
                logits_to_keep=1)


def _phase_graph(m, kwargs: dict, merge: bool) -> fx.GraphModule:
    if not merge:
        return m.graph((), kwargs)  # the adapted graph (eval mode: the caller's context)
    model = m.merged_module()
    model.eval()
    return capture(model, (), kwargs, training=False).graph_module


def _inline_constants(gm: fx.GraphModule, leaves: list) -> list:
    """Non-tensor inputs (use_cache, logits_to_keep) are fixed at export: baked into the graph."""
    kept = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], leaves):
        if isinstance(value, torch.Tensor):
            kept.append(value)
        else:
            node.replace_all_uses_with(value)  # noqa: the placeholder's users read the constant
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return kept


def _flat_program(m, kwargs: dict, merge: bool, prompt_dim: Dim | None):
    gm = _phase_graph(m, kwargs, merge)
    step = FlatStep(gm)
    leaves = step.flatten((), kwargs)
    names = [n.name for n in step.gm.graph.nodes if n.op == "placeholder"]
    tensors = _inline_constants(step.gm, leaves)
    names = [n for n, v in zip(names, leaves) if isinstance(v, torch.Tensor)]
    shapes = tuple({1: prompt_dim} if prompt_dim is not None and n in ("input_ids", "position_ids") else None
                   for n in names)
    try:
        with no_background_compile():  # lowering="auto": torch.export and Dynamo share a process-wide flag
            ep = torch.export.export(step.gm, tuple(tensors), dynamic_shapes=shapes if prompt_dim else None,
                                     strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with what was exported
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(f"export(generate=True): torch.export failed on the {'prefill' if prompt_dim else 'decode'} "
                          f"graph: {type(err).__name__}: {first}") from err
    _snapshot(ep)
    return ep, names, tensors


def export_generation(m, args=(), kwargs=None, merge: bool = False, max_cache_len: int | None = None
                      ) -> GenerationPrograms:
    """Prefill and decode programs for `m`'s generation with a static cache (see the module docstring).
    `kwargs`: an example prompt batch, {"input_ids": [B, T], "attention_mask": [B, T] (optional)}."""
    _check_module(m)
    kwargs = dict(kwargs or {})
    if args:
        kwargs.setdefault("input_ids", args[0])
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ExportError("export(generate=True): pass kwargs={'input_ids': ids} with ids of shape (batch, prompt "
                          "length >= 2) (and optionally 'attention_mask').")
    extra = sorted(set(kwargs) - {"input_ids", "attention_mask"})
    if extra:
        raise ExportError(f"export(generate=True): inputs {extra} are not supported; the programs take input_ids and "
                          f"attention_mask.")
    if not m.can_generate() or getattr(m.config, "is_encoder_decoder", False):
        raise ExportError("export(generate=True): needs a decoder-only transformers model with a language-modelling "
                          "head (encoder-decoder models: use m.generate).")
    if m.table.pool is not None:
        raise ExportError("export(generate=True): a module with an adapter pool cannot be exported; export a module "
                          "compiled with the adapter itself (the pool's slots are indexed at run time).")
    mask = kwargs.get("attention_mask", torch.ones_like(ids))
    batch, prompt = ids.shape
    length = max_cache_len or CACHE_BUCKET * math.ceil((prompt + 1) / CACHE_BUCKET)
    if length <= prompt:
        raise ExportError(f"export(generate=True): max_cache_len={length} must exceed the example prompt ({prompt}).")
    with torch.no_grad(), _eval_mode(m):
        cache = _static_cache(m, batch, length)
        prefill, names, tensors = _flat_program(m, _phase_inputs(cache, ids, mask, length, decode=False), merge,
                                                Dim("prompt", min=2, max=length))
        cache = _static_cache(m, batch, length)
        decode, dnames, _ = _flat_program(m, _phase_inputs(cache, ids, mask, length, decode=True), merge, None)
    if names != dnames:
        raise ExportError(f"export(generate=True): prefill and decode take different inputs ({names} vs {dnames}).")
    cache_leaves = [(n, t) for n, t in zip(names, tensors) if n not in ("input_ids", "attention_mask", "position_ids")]
    metadata = {
        "inputs": names,
        "batch": batch,
        "max_cache_len": length,
        "cache": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                  for n, t in cache_leaves],
        "vocab_size": int(m.config.get_text_config(decoder=True).vocab_size),
        "unmerged": not merge,
    }
    return GenerationPrograms(prefill, decode, metadata)


def package_generation(programs: GenerationPrograms, path, force: bool = False, inductor_configs=None):
    """One .pt2 holding AOTInductor models "prefill" and "decode" (torch._inductor.package.load_package
    loads either by name), with the metadata a runner needs."""
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti

    path = _target(path, force, ".pt2")
    configs = dict(inductor_configs or {})
    configs["aot_inductor.package"] = True
    configs["aot_inductor.metadata"] = {META_KEY: json.dumps(programs.metadata)}
    files = {}
    for name, ep in programs.programs.items():
        model_configs = dict(configs)
        if is_unmerged(ep):  # constant-only subgraphs recomputed after load_constants (see export.package_program)
            model_configs.setdefault("aot_inductor.use_runtime_constant_folding", True)
        args, kwargs = ep.example_inputs
        try:
            files[name] = aot_compile(ep.module(check_guards=False), args, kwargs, options=model_configs)
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"package: AOTInductor could not compile the {name} program: {type(err).__name__}: "
                              f"{first}") from err
    with _atomic_path(path) as tmp:
        package_aoti(tmp, files)
    return path
