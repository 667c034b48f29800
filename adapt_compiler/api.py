"""compile(), export(), package(), backend(): orchestration only."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import compile_cache as compile_caches
from . import formats
from .checkpoint import load_adapter_state_dict, warn_if_quantization_differs
from .data_init import run_pending
from .errors import AdapterError, ExportError
from .export import export_onnx as _export_onnx
from .export import export_program, package_program
from .generation_export import GenerationPrograms, export_generation, package_generation
from .lowering import LOWERINGS
from .lowering.auto import unavailable as auto_unavailable
from .lowering.backend import make_backend
from .integrations.adapted_class import adapted_class
from .integrations.peft_surface import spec_of
from .module import AdaptedModule
from .spec import AdapterSpec


def _read_specs(spec, model: nn.Module, component: str | None = None) -> dict:
    """name -> (spec, checkpoint tensors or None, sub-adapters or None, where) from a spec, a dict of
    specs, or adapter paths (a PEFT dir, a kohya/LyCORIS or diffusers file: formats/); paths are read and
    validated against `model` here, before anything is built."""
    def one(name, s):
        s, _ = spec_of(s)  # a peft.LoraConfig (or any PeftConfig of our methods) as you would pass to PEFT
        if isinstance(s, (str, Path)):
            found, tensors, sub = formats.read_adapter(s, model, component)
            return found, tensors, sub, str(s)
        if isinstance(s, AdapterSpec):
            return s, None, None, None
        raise AdapterError(f"compile(): adapter {name!r} is a {type(s).__name__}; expected a spec, a peft "
                           f"config (e.g. peft.LoraConfig) or an adapter path (a PEFT dir, a kohya/LyCORIS or "
                           f"diffusers .safetensors file).")

    if isinstance(spec, (str, Path, AdapterSpec)) or hasattr(spec, "peft_type"):
        return {"default": one("default", spec)}
    if isinstance(spec, dict) and spec:
        return {name: one(name, s) for name, s in spec.items()}
    raise AdapterError(
        f"compile(): spec must be an adapter spec (e.g. ac.LoRA(r=8)), a peft config (e.g. peft.LoraConfig), a "
        f"dict of them, or a PEFT adapter directory; got {type(spec).__name__}."
    )


def compile(model: nn.Module, spec, *, merge: bool = False, example_inputs=None, lowering: str = "inductor",
            adapter_name: str | None = None, verify: bool = True, component: str | None = None,
            memory_budget: float | None = None, max_adapters: int | None = None, max_rank: int | None = None,
            evict: bool = False, compile_cache: bool = False, init_data=None) -> AdaptedModule:
    """Adapt `model` with `spec`. The model itself is never modified.

    `spec` may be an adapter path: a PEFT directory, or a kohya/LyCORIS or diffusers .safetensors file
    (formats/). A single file can hold adapters for several models of a pipeline; the part that fits
    `model` is used, or the one `component=` names ("unet", "transformer", "text_encoder", ...).

    `lowering`: "inductor" (default; the whole graph, compiled on the first call of each input structure),
    "regional" (each distinct repeated block compiled once), "eager" (the FX graph as is, no compile),
    "auto" (eager calls while the "inductor" graph compiles in a background thread, then that graph:
    lowering/auto.py), or a torch.compile backend.

    `verify` (default on): the first call of each compiled graph is checked against the eager
    graph (outputs, and in training every adapter gradient); a graph that disagrees falls back to
    eager with a CompilerMismatchWarning. Costs one eager step per new graph (and, in training, one more
    forward of the compiled graph).

    `memory_budget` (0 < b <= 1, default None = no limit): the share of activation memory a training
    step may keep; the rest is recomputed in the backward (Inductor: AOTAutograd's activation
    memory budget; eager: that share of the repeated blocks keeps its activations, the rest is
    checkpointed). Gradient checkpointing proper: `m.gradient_checkpointing_enable()`, or the model's
    own flag set before compile.

    Returns an instance of `Adapted<ModelClass>` (a subclass of AdaptedModule, and of
    peft.PeftModel when peft is installed: integrations/adapted_class.py).

    `max_adapters=N` (with `max_rank=r`, default the spec's r): a serving pool over the spec's target
    layers, compiled once; the spec's LoRA adapters and every LoRA loaded later take its slots
    (`AdaptedModule.reserve`). `evict=True`: a full pool drops its least recently used adapter.

    `compile_cache=True` (with `spec` a PEFT directory saved by `m.save_adapter(dir, compile_cache=True)`):
    load the compile caches saved there before anything is compiled, if they were made for this
    model, spec, torch and adapt_compiler code; report() says whether they were loaded or why not
    (compile_cache.py). Off by default: the cache holds pickled compiled code.

    `init_data` (a dataloader, or a list of batches): the data pass of a data-driven LoRA init, run before
    compile returns: `LoRA(init="eva")` (ac.initialize_eva), `LoRA(init="corda")` (ac.preprocess_corda, one
    sample per batch) and `LoRA(init="lora_ga")` (ac.preprocess_loraga: each batch's loss backpropagated).
    Without it such an adapter waits for that call (a CorDA adapter whose corda_config cache_file exists is
    completed from the cache). data_init/ says what each leaves."""
    if not isinstance(model, nn.Module):
        raise AdapterError(f"compile(): model must be a torch.nn.Module, got {type(model).__name__}.")
    if lowering not in LOWERINGS and not callable(lowering):
        raise AdapterError(f"compile(): lowering={lowering!r} is not one of {LOWERINGS} or a torch.compile backend "
                           f"(a callable).")
    if lowering == "auto" and (why := auto_unavailable()):
        raise AdapterError(f"compile(): lowering='auto' is not available here: {why}. Use lowering='inductor' (compile "
                           f"before the first step) or 'eager' (no compile).")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or not 0 < memory_budget <= 1):
        raise AdapterError(f"compile(): memory_budget={memory_budget!r} must be a number in (0, 1] (the share of "
                           f"activation memory a training step keeps), or None.")
    cache_dir = _compile_cache_dir(spec, compile_caches.check_flag(compile_cache, "compile()"))
    read = _read_specs(spec, model, component)
    if adapter_name is not None and len(read) == 1:
        read = {adapter_name: next(iter(read.values()))}
    pool = None
    if max_adapters is not None or max_rank is not None:
        ranks = [getattr(r[0], "r", None) for r in read.values()]
        rank = max_rank if max_rank is not None else max((x for x in ranks if isinstance(x, int)), default=None)
        if max_adapters is None or rank is None:
            raise AdapterError("compile(): a serving pool needs max_adapters=N and max_rank=r (or a LoRA spec's r).")
        pool = {"max_adapters": max_adapters, "max_rank": rank, "evict": evict}
    example = _split_inputs(example_inputs) if example_inputs is not None else None
    cls = adapted_class(AdaptedModule, type(model))
    m = cls(model, {n: r[0] for n, r in read.items()}, lowering=lowering,
            sub_adapters={n: r[2] for n, r in read.items() if r[2] is not None}, verify=verify,
            memory_budget=None if memory_budget is None else float(memory_budget), example_inputs=example,
            pool=pool)
    for name, (spec_, tensors, _, where) in read.items():
        if tensors is not None and m.table.pool is not None and name in m.table.pool:
            m._into_pool(name, spec_, tensors, where)
        elif tensors is not None:
            load_adapter_state_dict(m.table, tensors, name, where=where)
    for name, (_, tensors, _, where) in read.items():
        if tensors is not None:
            warn_if_quantization_differs(m.table, name, where)
    run_pending(m, init_data)  # EVA / CorDA: their data passes (or CorDA's cache file)
    if merge:
        m.merge()
        m.eval()
    if cache_dir is not None and (compile_cache or compile_caches.present(cache_dir)):
        # before the first compile: the graphs compiled at the first call find their cache entries
        m._compile_cache_line = compile_caches.load(cache_dir, m.table, m._compile_options(), trusted=compile_cache)
    m._start_cpu_setup()  # runs while the caller builds its optimizer and data, and while it captures
    if example_inputs is not None:
        args, kwargs = _split_inputs(example_inputs)
        m.capture(args, kwargs)
    return m


def _compile_cache_dir(spec, wanted: bool) -> Path | None:
    """The adapter directory a compile cache would sit in (`spec` a path to a directory), else None;
    compile_cache=True without one is refused by name."""
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        return Path(spec)
    if wanted:
        raise AdapterError(f"compile(): compile_cache=True loads the compile cache saved next to an adapter "
                           f"(m.save_adapter(dir, compile_cache=True)); spec must be that directory, got "
                           f"{type(spec).__name__}. Drop compile_cache=True or pass the directory.")
    return None


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def export(m: AdaptedModule, args=(), kwargs=None, merge: bool | None = None, dynamic: bool = True,
           generate: bool = False, max_cache_len: int | None = None):
    """torch.export of the adapted module (merge=True by default). `generate=True`: the prefill and decode
    programs of static-cache generation instead (GenerationPrograms; unmerged by default, so adapters
    swap with load_constants), from an example prompt batch in kwargs (generation_export.py)."""
    if generate:
        return export_generation(m, args, kwargs, merge=bool(merge), max_cache_len=max_cache_len)
    if max_cache_len is not None:
        raise ExportError("export(): max_cache_len= only applies with generate=True (the generation programs' static "
                          "cache); pass generate=True or drop max_cache_len.")
    return export_program(m, args, kwargs, merge=True if merge is None else merge, dynamic=dynamic)


def package(ep, path, force: bool = False):
    """An AOTInductor .pt2 of an exported program, or of both generation programs (one file)."""
    if isinstance(ep, GenerationPrograms):
        return package_generation(ep, path, force=force)
    return package_program(ep, path, force=force)


def export_onnx(m: AdaptedModule, args=(), path="model.onnx", kwargs=None, force: bool = False):
    return _export_onnx(m, args, path, kwargs=kwargs, force=force)


def backend(spec_or_dir=None, merge: bool = False):
    return make_backend(spec_or_dir, merge=merge)
