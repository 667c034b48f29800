"""Ahead-of-time export for deployment: torch.export program, AOTInductor package, ONNX.

* ``export_program(m, args, kwargs, merge, dynamic)`` -> ``torch.export.ExportedProgram``.
  merge=True exports ``m.merged_module()`` (a copy of the base architecture with the active adapters
  folded into its weights: no adapter op is left). merge=False exports the adapted graph itself, with
  the adapter tensors as separate parameters named ``ac_slots.<layer>.adapters.<adapter>.<param>``
  (``ac_saved.*`` for modules_to_save copies, ``ac_graph_<adapter>.*`` for graph-level methods) next
  to the base weights under their own FQNs, so one artifact carries the base once and adapters can be
  swapped (``adapter_constants``). Batch and sequence dims (the first two dims of every tensor input)
  are dynamic by default.
* ``package_program(ep, path)`` -> an AOTInductor ``.pt2`` that ``torch._inductor.aoti_load_package``
  loads without this library. Unmerged programs are compiled with runtime constant folding, so
  ``runner.load_constants(adapter_constants(other), check_full_update=False)`` swaps adapters
  without recompiling.
* ``export_onnx(m, args, path)`` -> an ONNX model (torch.onnx dynamo exporter) of the merged program.

Nothing is half-written: every artifact goes to a temporary file next to the target and is renamed
into place; an existing path is refused unless force=True. The user's model and the AdaptedModule's
weights, mode and adapters are left as they were.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture import _dynamic_shapes, _explain
from .errors import AdapterError, ExportError
from .lowering.auto import no_background_compile
from .module import AdaptedModule
from .names import ADAPTER_PREFIXES, graph_target, saved_target, slot_target
from .passes import method_for
from .quant import op_kinds

QUANT_OPS = op_kinds()  # quantized layers' ops -> their kinds


# -- inputs -------------------------------------------------------------------------------------
def _normalize_inputs(args, kwargs) -> tuple[tuple, dict]:
    if kwargs is None:
        kwargs = {}
    if isinstance(args, dict) and not kwargs:  # ac.export(m, batch) with a dict batch
        args, kwargs = (), args
    if isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        args = (args,)
    if not isinstance(kwargs, dict):
        raise ExportError(f"export: kwargs must be a dict of example inputs, got {type(kwargs).__name__}.")
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise ExportError(
            "export: the example inputs contain no tensor; pass the inputs the model takes, e.g. "
            "ac.export(m, kwargs={'input_ids': ids, 'attention_mask': mask})."
        )
    return args, dict(kwargs)


def _check_module(m) -> None:
    if not isinstance(m, AdaptedModule):
        raise ExportError(
            f"export: expected the AdaptedModule returned by ac.compile(), got {type(m).__name__}; "
            f"for a plain module use torch.export.export directly."
        )


def _describe_inputs(args, kwargs) -> str:
    def one(x):
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        return repr(x) if not isinstance(x, (list, tuple, dict)) else type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _check_runs(fn, args, kwargs, what: str) -> None:
    """Run `fn` eagerly once so that inputs that do not fit give a clear error, not an export trace."""
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    except AdapterError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the inputs and the fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(
            f"export: the example inputs do not fit {what}: {type(err).__name__}: {first}. "
            f"Given: ({_describe_inputs(args, kwargs)}). Fix: pass inputs that model(*args, **kwargs) accepts "
            f"(names, dtypes, shapes), e.g. input_ids of shape (batch, seq) with token ids below the vocab size."
        ) from err


def _warn_static(args, kwargs, dynamic: bool) -> None:
    if not dynamic:
        return
    small = [(i, d) for i, x in enumerate(pytree.tree_leaves((args, kwargs))) if isinstance(x, torch.Tensor)
             for d in range(min(x.dim(), 2)) if x.shape[d] < 2]
    if small:
        warnings.warn(
            "export: an example input has size 1 (or 0) in a batch/sequence dim; torch.export specialises "
            "such dims, so the program will only accept that size there. Use examples with batch >= 2 and "
            "seq >= 2 for a program that takes any batch size and length.",
            stacklevel=3,
        )


@contextlib.contextmanager
def _eval_mode(m: nn.Module):
    """Export is for inference: eval mode during export, the module's own flags restored afterwards."""
    saved = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        yield
    finally:
        for mod, flag in saved:
            mod.training = flag


def _torch_export(module: nn.Module, args, kwargs, dynamic: bool, what: str):
    shapes = _dynamic_shapes(module, args, kwargs) if dynamic else None
    try:
        with no_background_compile():  # lowering="auto": torch.export and Dynamo share a process-wide flag
            return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as err:  # noqa: BLE001 - re-raised with the module and the fix
        raise ExportError(f"export ({what}): {_explain(module, err)}") from err


# -- export -------------------------------------------------------------------------------------
def _adapted_graph(m, args, kwargs) -> torch.fx.GraphModule:
    """The eval-mode adapted graph of `m` for these inputs (captures if needed; eager FX, not compiled)."""
    if m.merged:
        raise ExportError("export(merge=False): the module is merged; call m.unmerge() first or export with merge=True.")
    if not m.adapters_enabled:
        raise ExportError("export(merge=False): adapters are disabled; enable them (leave the "
                          "disable_adapters() context) or export the base model with torch.export.")
    model = m.table.model
    if not m.table.quant:  # (an eager eval forward of a bitsandbytes 4-bit model rewrites its weights on CPU)
        with _eval_mode(model):  # inputs that do not fit: a clear error before capture tries them
            _check_runs(model, args, kwargs, type(model).__name__)
    return m.graph(args, kwargs)


def export_program(m, args=(), kwargs=None, merge: bool = True, dynamic: bool = True):
    """See the module docstring. Returns a torch.export.ExportedProgram in eval mode."""
    _check_module(m)
    args, kwargs = _normalize_inputs(args, kwargs)
    _warn_static(args, kwargs, dynamic)
    if merge:
        model = m.merged_module()  # a copy: never the user's model; raises for non-mergeable methods
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _check_runs(model, args, kwargs, type(model).__name__)
        ep = _torch_export(model, args, kwargs, dynamic, "merged")
    else:
        with _eval_mode(m):
            gm = _adapted_graph(m, args, kwargs)
            # the graph module's attribute paths become the program's parameter names; export binds the
            # inputs to its forward signature (the captured input names)
            shapes = _dynamic_shapes(gm, args, kwargs) if dynamic else None
            try:
                with no_background_compile():
                    ep = torch.export.export(gm, args, kwargs, strict=False, dynamic_shapes=shapes)
            except Exception as err:  # noqa: BLE001
                raise ExportError(f"export (unmerged): {_explain(m.table.model, err)}") from err
        _snapshot(ep)
    return ep


def _snapshot(ep) -> None:
    """Give the program its own copies of the tensors it holds: the unmerged export references the
    module's live parameters, which later training, merge() or load_adapter would otherwise change."""
    with torch.no_grad():
        for table in (ep.state_dict, ep.constants):
            for key, value in list(table.items()):
                if isinstance(value, nn.Parameter):
                    table[key] = nn.Parameter(value.detach().clone(), requires_grad=False)
                elif isinstance(value, torch.Tensor):
                    table[key] = value.detach().clone()


def is_unmerged(ep) -> bool:
    """Whether an exported program carries adapter tensors separately (an export with merge=False)."""
    names = [*ep.state_dict, *ep.constants]
    return any(n.startswith(ADAPTER_PREFIXES) for n in names)


def adapter_constants(m, adapter_name: str | None = None, as_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of `m`, keyed as in an unmerged program or package (its constant FQNs).

    `adapter_name` (default: the first active adapter) is read; its keys name `as_name` (default: the
    same), i.e. the adapter the package was exported with. Pass the result to the loaded package's
    `load_constants(..., check_full_update=False)` to swap adapters without recompiling.
    """
    _check_module(m)
    name = adapter_name or m.active_adapters[0]
    if name not in m.state.specs:
        raise ExportError(f"adapter_constants: no adapter named {name!r}; known: {list(m.state.specs)}.")
    target = as_name or name
    out: dict[str, torch.Tensor] = {}
    table = m.table
    for slot in table.slots.values():
        if name in slot.adapters:
            for pname, t in slot.adapters[name].as_dict().items():
                out[f"{slot_target(slot.layer.fqn)}.adapters.{target}.{pname}"] = t
    for saved in table.saved.values():
        if name in saved.copies:
            for pname, t in saved.copies[name].state_dict(keep_vars=True).items():
                out[f"{saved_target(saved.fqn)}.copies.{target}.{pname}"] = t
    if name in table.graph_adapters:
        for pname, t in table.graph_adapters[name].state_dict(keep_vars=True).items():
            out[f"{graph_target(target)}.{pname}"] = t
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# -- files --------------------------------------------------------------------------------------
def _target(path, force: bool, suffix: str | None = None) -> Path:
    path = Path(path).expanduser()
    if suffix and path.suffix != suffix:
        raise ExportError(f"{path}: the file name must end with {suffix} (e.g. model{suffix}).")
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise ExportError(f"{path}: is a directory; pass a file path.")
        if not force:
            raise ExportError(f"{path}: already exists; refusing to overwrite it. Pass force=True (CLI: --force) "
                              f"or choose another path.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"{parent}: cannot create the directory (a file of that name exists); "
                          f"choose a writable path.")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"{parent}: cannot create the directory ({err}); choose a writable path.") from err
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{parent}: not writable; choose a writable path.")
    return path


@contextlib.contextmanager
def _atomic_path(path: Path):
    """A temporary file name next to `path` (same suffix); renamed onto `path` only on success."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.remove(tmp)  # writers create the file themselves
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _check_program(ep) -> None:
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ExportError(f"package: expected a torch.export.ExportedProgram (from ac.export), got {type(ep).__name__}.")


def save_program(ep, path, force: bool = False) -> Path:
    """torch.export.save, atomically, refusing to overwrite unless force=True."""
    _check_program(ep)
    path = _target(path, force, ".pt2")
    with _atomic_path(path) as tmp:
        torch.export.save(ep, tmp)
    return path


def _plain_spec(spec):
    """The same tree with every non-builtin container (e.g. transformers' ModelOutput) as a tuple."""
    if spec.is_leaf() or spec.type is type(None):
        return spec
    children = [_plain_spec(c) for c in spec.children()]
    if spec.type in (tuple, list, dict):
        return pytree.TreeSpec(spec.type, spec.context, children)
    if spec.type is collections.OrderedDict:
        return pytree.TreeSpec(dict, list(spec.context), children)
    return pytree.TreeSpec(tuple, None, children)  # like HF's return_dict=False / ModelOutput.to_tuple()


def _with_plain_outputs(ep):
    """A shallow copy of `ep` whose output structure needs no library to rebuild (a deployed package
    must load without transformers): ModelOutput-like containers become tuples."""
    graph = list(ep.module_call_graph)
    if not graph or graph[0].signature is None or graph[0].signature.out_spec is None:
        return ep
    plain = _plain_spec(graph[0].signature.out_spec)
    if plain == graph[0].signature.out_spec:
        return ep
    new = copy.copy(ep)
    graph[0] = dataclasses.replace(graph[0], signature=dataclasses.replace(graph[0].signature, out_spec=plain))
    new._module_call_graph = graph
    return new


def _decompose_quantized(ep):
    """The program with each quantized layer's op (quant/) replaced by its pure-ATen inference form,
    which AOTInductor compiles; a kind without one (its kernel is a Python/bitsandbytes function
    AOTInductor cannot compile into a package) is refused naming the layer kind."""
    present = {node.target for node in ep.graph.nodes if node.op == "call_function"} & set(QUANT_OPS)
    if not present:
        return ep
    missing = sorted(QUANT_OPS[op].label for op in present if QUANT_OPS[op].decompose is None)
    if missing:
        raise ExportError(
            f"package: the program runs {', '.join(missing)} layers, whose kernels are bitsandbytes code that "
            f"AOTInductor cannot compile into a package. The exported program itself runs (ep.module(), with "
            f"adapt_compiler and bitsandbytes imported). For a package: export the merged, dequantized model "
            f"(ac.export(m, ..., merge=True) merges into m.merged_module()), or quantize the base with torchao "
            f"int8 (TorchAoConfig(Int8WeightOnlyConfig())), whose op has a pure-ATen form."
        )
    return ep.run_decompositions({op: QUANT_OPS[op].decompose for op in present})


def package_program(ep, path, force: bool = False, inductor_configs: dict | None = None) -> Path:
    """AOTInductor-compile `ep` into a `.pt2` package at `path` (loadable with aoti_load_package).

    The package's outputs are the program's output tensors in the same nesting, with non-builtin
    containers as tuples (a transformers ModelOutput comes back as `(logits, ...)`, like
    return_dict=False), so loading needs neither this library nor transformers.
    """
    _check_program(ep)
    path = _target(path, force, ".pt2")
    ep = _with_plain_outputs(_decompose_quantized(ep))
    configs = dict(inductor_configs or {})
    if is_unmerged(ep):
        # keep constant-only subgraphs (e.g. weight-side ΔW) out of the baked constants: they are
        # recomputed after load_constants, so swapped adapter weights take effect
        configs.setdefault("aot_inductor.use_runtime_constant_folding", True)
    with _atomic_path(path) as tmp:
        try:
            out = torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=configs)
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"package: AOTInductor could not compile the program: {type(err).__name__}: {first}") from err
        if os.fspath(out) != tmp and os.path.exists(out):
            os.replace(out, tmp)
    return path


def export_onnx(m, args=(), path="model.onnx", kwargs=None, force: bool = False, merge: bool | None = None,
                dynamic: bool = True, opset_version: int | None = None) -> Path:
    """An ONNX model of the merged program (torch.onnx.export, dynamo=True), runnable in onnxruntime.

    merge=None merges when every active adapter is mergeable and exports the adapted graph otherwise
    (graph-level methods such as Llama-Adapter and X-LoRA have no weight form).
    """
    _check_module(m)
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError as err:
        raise ExportError("export_onnx: needs the `onnx` extra: pip install 'adapt-compiler[onnx]'.") from err
    path = _target(path, force, ".onnx")
    if merge is None:
        merge = all(method_for(m.state.specs[n]).merge_kind != "none" for n in m.active_adapters)
    ep = export_program(m, args, kwargs, merge=merge, dynamic=dynamic)
    kw = {} if opset_version is None else {"opset_version": opset_version}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, dynamo=True, verbose=False, **kw)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ExportError(f"export_onnx: the ONNX exporter failed: {type(err).__name__}: {first}") from err
    tmpdir = tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        tmp = os.path.join(tmpdir, path.name)
        program.save(tmp)
        # large models carry external data files next to the .onnx; move those first, the model last
        for name in sorted(os.listdir(tmpdir)):
            if name != path.name:
                os.replace(os.path.join(tmpdir, name), path.parent / name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
