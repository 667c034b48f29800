"""compile(), export(), package(), backend(): orchestration only."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .module import AdaptedModule
from .passes.method import AdapterError
from .spec import AdapterSpec


def _specs_from(model: nn.Module, spec) -> tuple[dict, dict]:
    """(name -> spec, name -> checkpoint dir to load) from a spec, a dict of specs, or a PEFT dir."""
    from .checkpoint import spec_from_dir

    if isinstance(spec, (str, Path)):
        return {"default": spec_from_dir(spec)}, {"default": spec}
    if isinstance(spec, AdapterSpec):
        return {"default": spec}, {}
    if isinstance(spec, dict) and spec:
        specs, dirs = {}, {}
        for name, s in spec.items():
            if isinstance(s, (str, Path)):
                specs[name], dirs[name] = spec_from_dir(s), s
            elif isinstance(s, AdapterSpec):
                specs[name] = s
            else:
                raise AdapterError(f"compile(): adapter {name!r} is a {type(s).__name__}; expected a spec or a PEFT dir.")
        return specs, dirs
    raise AdapterError(
        f"compile(): spec must be an adapter spec (e.g. ac.LoRA(r=8)), a dict of them, or a PEFT adapter "
        f"directory; got {type(spec).__name__}."
    )


def compile(model: nn.Module, spec, *, merge: bool = False, example_inputs=None, lowering: str = "inductor",
            adapter_name: str | None = None) -> AdaptedModule:
    """Adapt `model` with `spec`. The model itself is never modified."""
    from .checkpoint import read_tensors, load_adapter_state_dict
    from .lowering import LOWERINGS

    if not isinstance(model, nn.Module):
        raise AdapterError(f"compile(): model must be a torch.nn.Module, got {type(model).__name__}.")
    if lowering not in LOWERINGS:
        raise AdapterError(f"compile(): lowering={lowering!r} is not one of {LOWERINGS}.")
    specs, dirs = _specs_from(model, spec)
    if adapter_name is not None and len(specs) == 1:
        specs = {adapter_name: next(iter(specs.values()))}
        dirs = {adapter_name: d for d in dirs.values()}
    tensors = {name: read_tensors(d) for name, d in dirs.items()}  # read (and validate) before building
    m = AdaptedModule(model, specs, lowering=lowering)
    for name, t in tensors.items():
        load_adapter_state_dict(m, t, name, where=str(dirs[name]))
    if merge:
        m.merge()
        m.eval()
    if example_inputs is not None:
        args, kwargs = _split_inputs(example_inputs)
        m.capture(args, kwargs)
    return m


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def export(m: AdaptedModule, args=(), kwargs=None, merge: bool = True, dynamic: bool = True):
    from .export import export_program

    return export_program(m, args, kwargs, merge=merge, dynamic=dynamic)


def package(ep, path, force: bool = False):
    from .export import package_program

    return package_program(ep, path, force=force)


def export_onnx(m: AdaptedModule, args=(), path="model.onnx", kwargs=None, force: bool = False):
    from .export import export_onnx as _export_onnx

    return _export_onnx(m, args, path, kwargs=kwargs, force=force)


def backend(spec_or_dir=None, merge: bool = False):
    from .lowering.backend import make_backend

    return make_backend(spec_or_dir, merge=merge)
