"""AdaptedModule: the frozen base (shared storage), the adapters, and one graph per mode.

The user's model is never modified: base parameters are re-wrapped as frozen `nn.Parameter`s that
share storage with the user's tensors; merge swaps in new tensors and keeps the originals, so
unmerge restores them bit-for-bit without arithmetic.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import capture as capture_mod
from .passes import COUNTERS, insert_weight_adapters, method_for, redirect_saved_modules
from .passes import debug_print
from .passes.match import describe_layer, layer_kind
from .passes.method import AdapterError
from .slots import AdapterParams, AdapterSlot, AdapterState, SavedModuleSlot, slot_key
from .spec import resolve_targets

SLOTS = "ac_slots"
SAVED = "ac_saved"
GRAPH = "ac_graph"


@dataclass
class _Graphs:
    """The graphs of one capture (mode + input structure), built and lowered lazily."""

    captured: capture_mod.Captured
    variants: dict = field(default_factory=dict)  # "adapted" | "merged" | "disabled" -> GraphModule
    lowered: dict = field(default_factory=dict)  # same keys -> callable


class _Disabled(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.enable_adapters()
        return False


class AdaptedModule(nn.Module):
    def __init__(self, model: nn.Module, specs: dict, lowering: str = "inductor"):
        super().__init__()
        if not specs:
            raise AdapterError("compile(): no adapter spec given; pass e.g. ac.LoRA(r=8, targets=[...]).")
        self.__dict__["_model"] = model  # not a child: its params are not ours
        self.lowering = lowering
        self.state = AdapterState()
        self.slots = nn.ModuleDict()  # slot_key(fqn) -> AdapterSlot
        self.saved = nn.ModuleDict()  # slot_key(fqn) -> SavedModuleSlot
        self.graph_adapters = nn.ModuleDict()  # adapter name -> params of a graph-level method
        self.base = nn.Module()  # frozen view of the model's params/buffers, same storage
        self._frozen: dict[str, torch.Tensor] = {}  # FQN -> frozen tensor (tied weights share one)
        self._originals: dict[str, torch.Tensor] = {}  # merged FQN -> original data
        self._graphs: dict = {}
        self._traced: dict = {}  # simple structure key -> entry of the last eager call (see _traced_forward)
        self._enabled = True
        self._merged = False
        self._freeze_base(model)
        for name, spec in specs.items():
            self.add_adapter(name, spec)
        self.set_adapter(next(iter(specs)))
        self.train(model.training)  # start in the user's model's mode

    # -- construction --------------------------------------------------------------------
    def _freeze_base(self, model: nn.Module) -> None:
        by_id: dict[int, torch.Tensor] = {}
        for fqn, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if id(t) not in by_id:
                by_id[id(t)] = nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t
            self._frozen[fqn] = by_id[id(t)]
        for i, t in enumerate(dict.fromkeys(by_id.values())):
            # registered once, so .to()/.state_dict() see them; the graphs reach them by FQN
            if isinstance(t, nn.Parameter):
                self.base.register_parameter(f"p{i}", t)
            else:
                self.base.register_buffer(f"b{i}", t, persistent=False)

    def add_adapter(self, name: str, spec) -> None:
        """Create an adapter's parameters now (users build the optimizer before the first call)."""
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without dots.")
        if name in self.state.specs:
            raise AdapterError(f"adapter {name!r} already exists; pick another name or delete_adapter({name!r}).")
        method = method_for(spec)
        model = self._model
        for target in spec.modules_to_save or []:  # validated before anything is created
            self._saved_module_fqns(target)
        if getattr(method, "kind", "weight") == "graph":
            method.setup(self, name, spec)
        else:
            fqns = resolve_targets(spec, model, layer_kind)
            modules = dict(model.named_modules())
            layers = {fqn: describe_layer(fqn, modules[fqn]) for fqn in fqns}
            for layer in layers.values():  # validate everything before creating anything
                method.check(spec, layer)
            created = {}
            for fqn, layer in layers.items():
                weight = self._canonical_weight(fqn, layer)
                tensors = method.init_params(spec, layer, weight)
                created[fqn] = (layer, AdapterParams(tensors, method.buffer_names))
            for fqn, (layer, params) in created.items():
                key = slot_key(fqn)
                if key not in self.slots:
                    self.slots[key] = AdapterSlot(layer, self.state)
                self.slots[key].add(name, method, params.to(self._frozen[fqn + ".weight"].device))
        for fqn in spec.modules_to_save or []:
            self._add_saved_module(name, fqn)
        self.state.specs[name] = spec
        for n, p in self._adapter_tensors():  # like PEFT: an adapter that is not active is frozen
            if n == name:
                p.requires_grad_(name in self.state.active)
        self.invalidate_graphs()  # the adapted graphs change; base captures could be kept, but are cheap

    def delete_adapter(self, name: str) -> None:
        if name not in self.state.specs:
            raise AdapterError(f"delete_adapter: no adapter named {name!r}; known: {list(self.state.specs)}.")
        if self._merged and name in self.state.active:
            raise AdapterError(f"delete_adapter: adapter {name!r} is merged; unmerge() first.")
        for key in list(self.slots):
            slot = self.slots[key]
            if name in slot.methods:
                slot.remove(name)
            if not slot.methods:
                del self.slots[key]
        for key in list(self.saved):
            self.saved[key].copies.pop(name, None)
            if not len(self.saved[key].copies):
                del self.saved[key]
        if name in self.graph_adapters:
            del self.graph_adapters[name]
        del self.state.specs[name]
        self.state.active = tuple(n for n in self.state.active if n != name)
        self.invalidate_graphs()

    def _saved_module_fqns(self, target: str) -> list[str]:
        modules = dict(self._model.named_modules())
        hits = [f for f in modules if f and (f == target or f.endswith("." + target))]
        if not hits:
            import difflib

            leaves = sorted({f.split(".")[-1] for f in modules if f})
            close = difflib.get_close_matches(str(target).split(".")[-1], leaves, n=5, cutoff=0.4)
            hint = f"close module names: {', '.join(close)}" if close else f"module names include: {', '.join(leaves[:12])}"
            raise AdapterError(f"modules_to_save: no module named {target!r}; {hint}.")
        return hits

    def _add_saved_module(self, name: str, target: str) -> None:
        modules = dict(self._model.named_modules())
        for fqn in self._saved_module_fqns(target):
            key = slot_key(fqn)
            if key not in self.saved:
                self.saved[key] = SavedModuleSlot(fqn, self.state)
            clone = copy.deepcopy(modules[fqn])
            for p in clone.parameters():
                p.requires_grad_(True)
            self.saved[key].copies[name] = clone

    def _canonical_weight(self, fqn: str, layer) -> torch.Tensor:
        w = self._frozen[fqn + ".weight"]
        return w.t() if layer.transposed else w

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """DDP skips these: the frozen base is neither broadcast at wrap time nor with the buffers each
        step, so only adapter tensors are communicated. Every rank must load the same base weights."""
        return [f"base.{n}" for n, _ in [*self.base.named_parameters(), *self.base.named_buffers()]]

    # -- adapter selection -----------------------------------------------------------------
    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self.state.active

    def set_adapter(self, names) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in self.state.specs]
        if unknown:
            raise AdapterError(f"set_adapter: unknown adapter(s) {unknown}; known: {list(self.state.specs)}.")
        if self._merged:
            raise AdapterError("set_adapter: unmerge() first; the weights hold the merged adapter.")
        self.state.active = names
        for name, p in self._adapter_tensors():
            p.requires_grad_(name in names)

    def _adapter_tensors(self):
        for slot in self.slots.values():
            for name, params in slot.adapters.items():
                for p in params.parameters():
                    yield name, p
        for slot in self.saved.values():
            for name, clone in slot.copies.items():
                for p in clone.parameters():
                    yield name, p
        for name, holder in self.graph_adapters.items():
            for p in holder.parameters():
                if not getattr(p, "_ac_frozen", False):
                    yield name, p

    def adapter_parameters(self):
        """The trainable parameters (the active adapters'); the base is frozen."""
        return [p for _, p in self._adapter_tensors() if p.requires_grad]

    def named_adapter_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def disable_adapters(self):
        """Run the base model. Also a context manager: `with m.disable_adapters(): ...`."""
        self._enabled = False
        return _Disabled(self)

    def enable_adapters(self) -> None:
        self._enabled = True

    def train(self, mode: bool = True):
        super().train(mode)
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward(self, *args, adapter_names=None, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile(m): Dynamo traces the graph an eager call built
            return self._traced_forward(args, kwargs, adapter_names)
        entry = self._graphs_for(args, kwargs)
        self._traced[_structure_key(self.training, args, kwargs)] = entry
        variant = self._variant()
        if adapter_names is not None:
            from .lowering.mixed import check_adapter_names

            self.state.mixed = check_adapter_names(self, adapter_names, args, kwargs)
            variant = "adapted"
        try:
            return self._lowered(entry, variant)(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _traced_forward(self, args, kwargs, adapter_names):
        """forward under Dynamo: no capture, no nested torch.compile; the already-built graph is inlined."""
        entry = self._traced.get(_structure_key(self.training, args, kwargs))
        variant = self._variant() if adapter_names is None else "adapted"
        gm = None if entry is None else entry.variants.get(variant)
        if gm is None:
            raise AdapterError(
                f"torch.compile(AdaptedModule): no {variant!r} graph for these inputs yet; call the module once "
                f"eagerly with inputs of this structure (or ac.compile(..., example_inputs=...)) before compiling."
            )
        if adapter_names is not None:
            from .lowering.mixed import check_adapter_names

            self.state.mixed = check_adapter_names(self, adapter_names, args, kwargs)
        try:
            return gm(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _variant(self) -> str:
        if not self._enabled:
            return "disabled"
        return "merged" if self._merged else "adapted"

    def _graphs_for(self, args, kwargs) -> _Graphs:
        key = (self.training, capture_mod.signature(args, kwargs))
        entries = self._graphs.setdefault(key, [])
        for entry in entries:
            if capture_mod.fits(entry.captured, args, kwargs):
                return entry
        from .progress import status

        with status(f"capturing {type(self._model).__name__} ({'train' if self.training else 'eval'}) with torch.export"):
            entry = _Graphs(capture_mod.capture(self._model, args, kwargs, self.training))
        entries.append(entry)
        COUNTERS["captures"] += 1
        return entry

    def capture(self, args=(), kwargs=None) -> None:
        """Capture the graphs for this input structure now (train and eval), not on the first call."""
        kwargs = kwargs or {}
        mode = self.training
        for training in (mode,):
            self.train(training)
            entry = self._graphs_for(tuple(args), kwargs)
            self._traced[_structure_key(training, tuple(args), kwargs)] = entry
            self._build(entry, "adapted")
        self.train(mode)

    def _build(self, entry: _Graphs, variant: str) -> fx.GraphModule:
        if variant in entry.variants:
            return entry.variants[variant]
        source = entry.captured.graph_module
        graph = copy.deepcopy(source.graph)
        root = self._graph_root(source)
        gm = fx.GraphModule(root, graph)
        for name in (SLOTS, SAVED, *(f"ac_graph_{n}" for n in self.graph_adapters)):
            setattr(gm, name, getattr(root, name))
        if variant in ("adapted", "merged") and len(self.saved):
            redirect_saved_modules(gm, {m.fqn: m for m in self.saved.values()}, SAVED)
        if variant == "adapted":
            slots = {s.layer.fqn: s for s in self.slots.values()}
            if slots:
                insert_weight_adapters(gm, slots, SLOTS)
            from .passes.method import GraphMethod

            for name, spec in self.state.specs.items():
                method = method_for(spec)
                if isinstance(method, GraphMethod):
                    method.rewrite(gm, self, name, entry.captured)
            from .lowering import choose_orders
            from .lowering.batching import batch_parameter_transforms

            choose_orders(self, gm)
            batch_parameter_transforms(self, gm, root)
        gm.graph.lint()
        gm = fx.GraphModule(root, gm.graph)  # keeps only what the final graph references
        debug_print(gm, f"adapter passes ({variant})")
        entry.variants[variant] = gm
        return gm

    def _graph_root(self, source: fx.GraphModule) -> nn.Module:
        """A root whose attribute paths are the model's FQNs (frozen tensors) plus the slots."""
        root = nn.Module()
        for node in source.graph.nodes:
            if node.op == "get_attr":
                t = self._frozen.get(node.target)
                if t is None:  # a constant export lifted (not a model tensor)
                    t = _get_path(source, node.target)
                _set_path(root, node.target, t)
            elif node.op == "call_module":  # export's own helpers (e.g. _guards_fn)
                _set_path(root, node.target, source.get_submodule(node.target))
        setattr(root, SLOTS, self.slots)
        setattr(root, SAVED, self.saved)
        for name, holder in self.graph_adapters.items():
            setattr(root, f"ac_graph_{name}", holder)
        return root

    def _lowered(self, entry: _Graphs, variant: str):
        fn = entry.lowered.get(variant)
        if fn is None:
            from .lowering import lower

            fn = entry.lowered[variant] = lower(self._build(entry, variant), self.lowering)
        return fn

    # -- merge -----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapters into the (frozen copies of the) base weights."""
        from .lowering.merge import merge_into

        if self._merged:
            return
        self._originals = merge_into(self)
        self._merged = True

    def unmerge(self) -> None:
        """Restore the original weights bit-for-bit (kept, never recomputed)."""
        for fqn, original in self._originals.items():
            self._frozen[fqn].data = original
        self._originals = {}
        self._merged = False

    @property
    def merged(self) -> bool:
        return self._merged

    def merged_module(self) -> nn.Module:
        """A plain module of the base architecture with the active adapters merged into its weights."""
        from .lowering.merge import merged_copy

        return merged_copy(self)

    # -- adapters as files -------------------------------------------------------------------
    def save_adapter(self, path, adapter_name: str | None = None) -> None:
        from .checkpoint import save_adapter

        save_adapter(self, path, adapter_name)

    def load_adapter(self, path, adapter_name: str = "default", hotswap: bool = False) -> None:
        from .checkpoint import load_adapter

        load_adapter(self, path, adapter_name, hotswap=hotswap)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        from .checkpoint import adapter_state_dict

        return adapter_state_dict(self, adapter_name or self.state.active[0])

    def load_adapter_state_dict(self, state_dict, adapter_name: str | None = None) -> None:
        from .checkpoint import load_adapter_state_dict

        load_adapter_state_dict(self, state_dict, adapter_name or self.state.active[0])

    # -- method hooks --------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor:
        """Sum of the active adapters' regularisers (AdaLoRA, HRA orthogonality); 0 if none."""
        total = None
        for name in self.state.active:
            spec = self.state.specs[name]
            method = method_for(spec)
            pairs = [(s.layer, s.params(name)) for s in self.slots.values() if name in s.methods]
            term = method.regularization_loss(spec, pairs) if hasattr(method, "regularization_loss") else None
            if term is not None:
                total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def xlora_scalings(self):
        """X-LoRA: the scalings (batch, seq, n_layers, n_experts) of the last call (PEFT's get_latest_scalings)."""
        for name in self.state.active:
            method = method_for(self.state.specs[name])
            if hasattr(method, "latest_scalings"):
                return method.latest_scalings(self, name)
        raise AdapterError("xlora_scalings: no active X-LoRA adapter.")

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation step (call after optimizer.step(), before zero_grad())."""
        done = False
        for name in self.state.active:
            method = method_for(self.state.specs[name])
            if hasattr(method, "update_and_allocate"):
                method.update_and_allocate(self, name, global_step)
                done = True
        if not done:
            raise AdapterError("update_and_allocate: no active AdaLoRA adapter.")

    def report(self, print_table: bool = False):
        from .report import build_report

        rep = build_report(self)
        if print_table:
            rep.print()
        return rep

    def slots_of(self, adapter_name: str):
        return [s for s in self.slots.values() if adapter_name in s.methods]

    def invalidate_graphs(self) -> None:
        self._graphs.clear()
        self._traced.clear()


def _structure_key(training: bool, args: tuple, kwargs: dict) -> tuple:
    """A key Dynamo can compute and hash (pytree specs it cannot): mode, arg count, kwarg names, ranks."""
    values = (*args, *kwargs.values())
    return training, len(args), tuple(kwargs), tuple(v.dim() if isinstance(v, torch.Tensor) else None for v in values)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: nn.Module, path: str, value) -> None:
    *parents, leaf = path.split(".")
    obj = root
    for part in parents:
        if not hasattr(obj, part):
            obj.add_module(part, nn.Module())
        obj = getattr(obj, part)
    if isinstance(value, nn.Parameter):
        obj.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        obj.register_buffer(leaf, value, persistent=False)
    else:
        setattr(obj, leaf, value)


def flat_outputs(out):
    return pytree.tree_leaves(out)
