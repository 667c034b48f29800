"""compile(), export(), package(), backend(): orchestration only."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint
from .errors import AdapterError
from .export import export_onnx as _export_onnx
from .export import export_program, package_program
from .lowering import LOWERINGS
from .lowering.backend import make_backend
from .module import AdaptedModule
from .spec import AdapterSpec


def _read_specs(spec) -> dict:
    """name -> (spec, checkpoint tensors or None, sub-adapters or None, where) from a spec, a dict
    of specs, or a PEFT dir; directories are read and validated here, before anything is built."""
    def one(name, s):
        if isinstance(s, (str, Path)):
            found, tensors, sub = checkpoint.read_adapter(s)
            return found, tensors, sub, str(s)
        if isinstance(s, AdapterSpec):
            return s, None, None, None
        raise AdapterError(f"compile(): adapter {name!r} is a {type(s).__name__}; expected a spec or a PEFT dir.")

    if isinstance(spec, (str, Path, AdapterSpec)):
        return {"default": one("default", spec)}
    if isinstance(spec, dict) and spec:
        return {name: one(name, s) for name, s in spec.items()}
    raise AdapterError(
        f"compile(): spec must be an adapter spec (e.g. ac.LoRA(r=8)), a dict of them, or a PEFT adapter "
        f"directory; got {type(spec).__name__}."
    )


def compile(model: nn.Module, spec, *, merge: bool = False, example_inputs=None, lowering: str = "inductor",
            adapter_name: str | None = None, verify: bool = True) -> AdaptedModule:
    """Adapt `model` with `spec`. The model itself is never modified.

    `verify` (default on): the first call of each compiled graph is checked against the eager
    graph (outputs, and in training every adapter gradient); a graph that disagrees falls back to
    eager with a CompilerMismatchWarning. Costs one eager step per new graph."""
    if not isinstance(model, nn.Module):
        raise AdapterError(f"compile(): model must be a torch.nn.Module, got {type(model).__name__}.")
    if lowering not in LOWERINGS and not callable(lowering):
        raise AdapterError(f"compile(): lowering={lowering!r} is not one of {LOWERINGS} or a torch.compile backend "
                           f"(a callable).")
    read = _read_specs(spec)
    if adapter_name is not None and len(read) == 1:
        read = {adapter_name: next(iter(read.values()))}
    m = AdaptedModule(model, {n: r[0] for n, r in read.items()}, lowering=lowering,
                      sub_adapters={n: r[2] for n, r in read.items() if r[2] is not None}, verify=verify)
    for name, (_, tensors, _, where) in read.items():
        if tensors is not None:
            checkpoint.load_adapter_state_dict(m.table, tensors, name, where=where)
            checkpoint.warn_if_quantization_differs(m.table, name, where)
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
    return export_program(m, args, kwargs, merge=merge, dynamic=dynamic)


def package(ep, path, force: bool = False):
    return package_program(ep, path, force=force)


def export_onnx(m: AdaptedModule, args=(), path="model.onnx", kwargs=None, force: bool = False):
    return _export_onnx(m, args, path, kwargs=kwargs, force=force)


def backend(spec_or_dir=None, merge: bool = False):
    return make_backend(spec_or_dir, merge=merge)
