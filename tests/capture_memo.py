"""The test session's capture memo: a base model captured once is not exported again by a later test.

Most tests build the same tiny models from the same seeds (models.py) and feed them the same
batches, and every AdaptedModule captures its model anew: torch.export of a 2-layer Llama takes
about 3 s per mode on this machine, and the suite captured such twins hundreds of times. A capture
depends only on the base model's structure, the inputs' structure and shapes, the mode and the
frozen tensors' dtypes; it does not depend on the adapter spec (the passes run on a copy, after
capture) nor on any tensor's values (export traces fake tensors). So a key of exactly those facts
finds a graph that a fresh export would give again.

On a hit the cached graph is copied and bound to this call's tensors: every get_attr that names a
parameter or buffer reads this model's (or the frozen stand-in the caller passed), as a fresh
export would; only the constants that export lifted out of the forward come from the first
capture, and those are hashed into the key when they come from a module attribute.

Anything the key cannot describe by value (an unknown object held by a module, a hook) is keyed by
its identity, so such a capture is memoised only for that very object: a miss, never a wrong hit.
A call whose inputs the key cannot describe (a leaf that is not a tensor or a plain scalar, a
pytree node whose context is not plain JSON) and a quantized model are always captured for real.
`AC_TEST_CAPTURE_MEMO=0` turns it off, for a run that exports every capture as a user's process
does. Tests of the capture itself still run it: every first key in a worker is a real export, and
COUNTERS["captures"] counts calls of the pipeline's capture, above this memo.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import os
import types

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from adapt_compiler.pipeline import _get_path

ENABLED = os.environ.get("AC_TEST_CAPTURE_MEMO", "1") != "0"
STATS = {"hits": 0, "misses": 0, "unkeyable": 0}
_MEMO: dict = {}
_SKIP = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
         "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
         "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
         "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
         "_load_state_dict_post_hooks", "_is_full_backward_hook"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _tensor_facts(t: torch.Tensor):
    return (type(t).__name__, tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device), t.requires_grad)


def _id(v) -> int:
    """An object's identity in a key. An id is unique only among live objects, so the memo keeps
    every object it keyed by identity alive (a class defined in one test, freed, and another
    allocated at its address must not hit)."""
    _PINS.append(v)
    return id(v)


_PINS: list = []


def _value(v, depth: int = 0):
    """A hashable description of a module attribute or input leaf: by value where that is what the
    forward can read, else by identity."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return (type(v).__name__, v)
    if isinstance(v, (torch.dtype, torch.device, torch.Size, enum.Enum)):
        return (type(v).__name__, repr(v))
    if isinstance(v, torch.Tensor):  # a plain tensor attribute becomes a constant of the graph: its values count
        data = v.detach().cpu().contiguous()
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return ("tensor", _tensor_facts(v), digest)
    if depth < 6 and isinstance(v, (tuple, list, set, frozenset)):
        items = [_value(x, depth + 1) for x in v]
        return (type(v).__name__, tuple(sorted(items, key=repr) if isinstance(v, (set, frozenset)) else items))
    if depth < 6 and isinstance(v, dict):
        return ("dict", tuple(sorted(((repr(k), _value(x, depth + 1)) for k, x in v.items()), key=repr)))
    if callable(getattr(v, "to_json_string", None)) and hasattr(v, "__dict__") and depth < 3:
        # a transformers config, by every attribute: its JSON leaves out private ones the forward
        # reads (`_attn_implementation` picks SDPA or eager attention)
        return ("config", type(v).__qualname__, tuple(sorted((k, _value(x, depth + 1)) for k, x in vars(v).items())))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type)):
        return ("fn", getattr(v, "__qualname__", ""), _id(v))
    if isinstance(v, types.MethodType):
        return ("method", _id(v.__func__), _id(v.__self__))
    if isinstance(v, functools.partial):
        return ("partial", _value(v.func, depth + 1), _value(v.args, depth + 1), _value(v.keywords, depth + 1))
    return ("id", type(v).__qualname__, _id(v))


def _model_key(model: nn.Module):
    modules = []
    for name, mod in model.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, _value(v)) for k, v in vars(mod).items() if k not in _SKIP))
        hooks = tuple(tuple(_id(h) for h in getattr(mod, h_name, {}).values()) for h_name in _HOOKS)
        forward = type(mod).forward
        modules.append((name, _id(type(mod)), _id(forward), attrs, hooks,
                        tuple(sorted(mod._non_persistent_buffers_set))))
    owners: dict[int, str] = {}
    tensors = []
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        first = owners.setdefault(id(t), name)  # tied tensors: export names them once
        tensors.append((name, _tensor_facts(t), first))
    hooks = tuple(_id(h) for h in nn.modules.module._global_forward_hooks.values())
    hooks += tuple(_id(h) for h in nn.modules.module._global_forward_pre_hooks.values())
    return tuple(modules), tuple(tensors), hooks


def _inputs_key(args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return str(spec), tuple(_tensor_facts(x) if isinstance(x, torch.Tensor) else _value(x) for x in leaves)


def _json_native(context, depth: int = 0) -> bool:
    """A pytree context made only of JSON values: what it says about the object is all there is to it."""
    if context is None or isinstance(context, (bool, int, float, str)):
        return True
    if depth > 20:
        return False
    if isinstance(context, (list, tuple)):
        return all(_json_native(c, depth + 1) for c in context)
    if isinstance(context, dict):
        return all(isinstance(k, (str, int)) and _json_native(v, depth + 1) for k, v in context.items())
    return False


def _plain_inputs(args, kwargs) -> bool:
    """Inputs whose pytree spec says everything the capture depends on besides the leaves' facts: tensors,
    Python scalars, the builtin containers, and registered nodes whose context is plain JSON. A
    transformers KV cache is such a node (transformers' exporter flatten writes its Python state, layer
    types, `is_initialized`, `is_updated`, into the context, so str(spec) names it by value), and so is a
    ModelOutput (`encoder_outputs`). Quantized layers' operands are not tensors of the model: those calls
    are always captured for real (see `memoised`)."""
    from adapt_compiler.integrations.kv_cache import register_cache_pytrees

    register_cache_pytrees()  # as capture does first: a cache flattens to its tensors, not one opaque leaf
    leaves, spec = pytree.tree_flatten((args, kwargs))
    plain = (type(None), bool, int, float, str, torch.Tensor)

    def described(node) -> bool:
        if node.type not in (None, tuple, list, dict) and not _json_native(node.context):
            return False
        return all(described(c) for c in node.children())

    return described(spec) and all(isinstance(x, plain) for x in leaves)


def _global_key():
    return (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), str(torch.get_default_dtype()),
            torch.are_deterministic_algorithms_enabled(), torch.__version__)


def _key(model, args, kwargs, training, tensors, root):
    stand_ins = tuple(sorted((k, _tensor_facts(t)) for k, t in (tensors or {}).items()))
    return (_global_key(), _model_key(model), _inputs_key(args, kwargs), bool(training), root, stand_ins)


def _owned(model) -> dict:
    """FQN -> every parameter and buffer of the model, tied ones under each of their names."""
    owned = dict(model.named_parameters(remove_duplicate=False))
    owned.update(model.named_buffers(remove_duplicate=False))
    return owned


class _Skeleton:
    """What the memo keeps of a capture: its graph and lifted constants, not the model's tensors."""

    def __init__(self, graph, constants, modules, in_spec, static_dims, training, root, pins):
        self.graph, self.constants, self.modules = graph, constants, modules
        self.in_spec, self.static_dims, self.training, self.root, self.pins = (
            in_spec, static_dims, training, root, pins)

    @classmethod
    def of(cls, captured, model, tensors, pins):
        """None when the graph reads a tensor of the model under a name that is not its own (a
        rebinding by name could not find this model's): such a capture is not memoised."""
        source = captured.graph_module
        owned = _owned(model)
        theirs = {id(t) for t in owned.values()} | {id(t) for t in (tensors or {}).values()}
        constants, modules = {}, {}
        for node in source.graph.nodes:
            if node.op == "get_attr":
                if node.target in owned or (tensors and node.target in tensors):
                    continue
                value = _get_path(source, node.target)
                if id(value) in theirs or isinstance(value, nn.Parameter):
                    return None
                constants[node.target] = value
            elif node.op == "call_module":
                modules[node.target] = source.get_submodule(node.target)
        return cls(copy.deepcopy(source.graph), constants, modules, captured.in_spec, captured.static_dims,
                   captured.training, captured.root, pins)


def _bound_copy(cached, model, tensors):
    """The cached capture's graph over this call's tensors (see the module docstring)."""
    from adapt_compiler.capture import Captured
    from adapt_compiler.names import attach

    source = cached.graph
    owned = _owned(model)
    holder = nn.Module()
    for node in source.nodes:
        if node.op == "get_attr":
            if tensors and node.target in tensors:  # the caller's stand-in, by the graph's own name for it
                value = tensors[node.target]
            elif node.target in owned:
                value = owned[node.target]
            else:  # a constant export lifted out of the forward
                value = cached.constants[node.target]
            attach(holder, node.target, value)
        elif node.op == "call_module":
            attach(holder, node.target, cached.modules[node.target])
    gm = fx.GraphModule(holder, copy.deepcopy(source))
    return Captured(gm, cached.in_spec, cached.static_dims, cached.training, cached.root)


def memoised(capture):
    """`capture` (adapt_compiler.capture.capture's signature) with the memo in front of it."""
    from adapt_compiler.quant import known_layers

    @functools.wraps(capture)
    def run(model, args, kwargs, training, tensors=None, root="", quant=None):
        if not ENABLED or quant or known_layers(model) or not _plain_inputs(args, kwargs):
            return capture(model, args, kwargs, training, tensors, root, quant)
        _PINS.clear()
        try:
            key = _key(model, tuple(args), dict(kwargs), training, tensors, root)
            hash(key)
            pins = list(_PINS)
        except Exception:  # noqa: BLE001 - something the key cannot describe: a real capture
            STATS["unkeyable"] += 1
            return capture(model, args, kwargs, training, tensors, root, quant)
        cached = _MEMO.get(key)
        if cached is not None:
            STATS["hits"] += 1
            return _bound_copy(cached, model, tensors)
        STATS["misses"] += 1
        captured = capture(model, args, kwargs, training, tensors, root, quant)
        skeleton = _Skeleton.of(captured, model, tensors, pins)
        if skeleton is not None:
            _MEMO[key] = skeleton
        return captured

    return run
