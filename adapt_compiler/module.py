"""AdaptedModule: the user-facing facade over the adapter table, the pipeline and the graph cache.

The user's model is never modified: base parameters are re-wrapped as frozen `nn.Parameter`s that
share storage with the user's tensors; merge swaps in new tensors and keeps the originals, so
unmerge restores them bit-for-bit without arithmetic. Everything the compiler reads lives in the
`AdapterTable` (`self.table`); graphs are built by `pipeline.build` and cached here per mode and
input structure, one per variant.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import checkpoint, pipeline
from .capture import Captured, fits, signature
from .counters import COUNTERS
from .errors import AdapterError
from .integrations.hf_model import HFModelAttributes
from .lowering import lowering_name
from .lowering import merge as merging
from .lowering.mixed import check_adapter_names
from .lowering.plan import decisions_of
from .lowering.slots import AdapterSlot, SavedModuleSlot
from .names import slot_key
from .passes import GraphMethod, method_for
from .passes.match import describe_layer, layer_kind
from .progress import status
from .report import build_report, region_lines
from .spec import resolve_targets
from .table import AdapterParams, AdapterState, AdapterTable


@dataclass
class _Entry:
    """The graphs of one capture (mode + input structure), built and lowered lazily per variant."""

    captured: Captured
    graphs: dict = field(default_factory=dict)  # variant -> GraphModule
    lowered: dict = field(default_factory=dict)  # variant -> callable


class _Disabled(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.enable_adapters()
        return False


class AdaptedModule(HFModelAttributes, nn.Module):
    def __init__(self, model: nn.Module, specs: dict, lowering: str = "inductor", sub_adapters: dict | None = None,
                 verify: bool = True):
        super().__init__()
        if not specs:
            raise AdapterError("compile(): no adapter spec given; pass e.g. ac.LoRA(r=8, targets=[...]).")
        self.__dict__["_model"] = model  # not a child: its params are not ours
        self.lowering = lowering
        self.verify = verify  # check each compiled graph's first call against the eager graph
        self.slots = nn.ModuleDict()  # slot_key(fqn) -> AdapterSlot
        self.saved = nn.ModuleDict()  # slot_key(fqn) -> SavedModuleSlot
        self.graph_adapters = nn.ModuleDict()  # adapter name -> modules of a graph-level method
        self.shared = nn.ModuleDict()  # adapter name -> tensors a weight method shares across layers
        self.base = nn.Module()  # frozen view of the model's params/buffers, same storage
        self.__dict__["table"] = AdapterTable(model, self._freeze_base(model), AdapterState(), self.slots,
                                              self.saved, self.graph_adapters, self.shared)
        self._originals: dict[str, torch.Tensor] = {}  # merged FQN -> original data
        self._graphs: dict = {}  # (training, input signature) -> [_Entry]
        self._traced: dict = {}  # simple structure key -> entry of the last eager call (see _traced_forward)
        self._enabled = True
        self._merged = False
        for name, spec in specs.items():
            self.add_adapter(name, spec, (sub_adapters or {}).get(name))
        self.set_adapter(next(iter(specs)))
        self.train(model.training)  # start in the user's model's mode

    @property
    def state(self) -> AdapterState:
        return self.table.state

    # -- construction --------------------------------------------------------------------
    def _freeze_base(self, model: nn.Module) -> dict[str, torch.Tensor]:
        frozen, by_id, names = {}, {}, {}
        for fqn, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if id(t) not in by_id:
                by_id[id(t)] = nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t
            frozen[fqn] = by_id[id(t)]
        for i, t in enumerate(dict.fromkeys(by_id.values())):
            # registered once, so .to()/.state_dict() see them; the graphs reach them by FQN
            if isinstance(t, nn.Parameter):
                names[id(t)] = f"p{i}"
                self.base.register_parameter(f"p{i}", t)
            else:
                names[id(t)] = f"b{i}"
                self.base.register_buffer(f"b{i}", t, persistent=False)
        self._base_names = {fqn: names[id(t)] for fqn, t in frozen.items()}  # FQN -> name under self.base
        return frozen

    def _apply(self, fn, recurse=True):
        """`.to(dtype/device)`, `.half()`, `.double()`, ...: the frozen base copies, the adapters and
        the kept originals of a merge move together; the user's model does not. Graphs are
        captured again (the captured one baked the old dtypes and devices in)."""
        super()._apply(fn, recurse)
        frozen = self.table.frozen
        for fqn, name in self._base_names.items():  # buffers are new tensor objects after _apply
            frozen[fqn] = getattr(self.base, name)
        self._originals = {k: fn(v) for k, v in self._originals.items()}
        self.invalidate_graphs()
        return self

    def add_adapter(self, name: str, spec, sub_adapters: dict | None = None) -> None:
        """Create an adapter's parameters now (users build the optimizer before the first call).
        `sub_adapters`: a graph method's sub-adapters as read by checkpoint.read_sub_adapters."""
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without dots.")
        if name in self.state.specs:
            raise AdapterError(f"adapter {name!r} already exists; pick another name or delete_adapter({name!r}).")
        method = method_for(spec)
        for target in spec.modules_to_save or []:  # validated before anything is created
            self._saved_module_fqns(target)
        if isinstance(method, GraphMethod):
            if sub_adapters is None:
                sub_adapters = checkpoint.read_sub_adapters(method, spec)
            holder, spec = method.setup(self.table, name, spec, {n: s for n, (s, _, _) in sub_adapters.items()})
            self.graph_adapters[name] = holder
            try:
                checkpoint.load_sub_adapters(self.table, method, name, sub_adapters)
            except Exception:
                del self.graph_adapters[name]
                raise
        else:
            self._add_weight_adapter(name, method, spec)
        for fqn in spec.modules_to_save or []:
            self._add_saved_module(name, fqn)
        self.state.specs[name] = spec
        for n, p in self._adapter_tensors():  # like PEFT: an adapter that is not active is frozen
            if n == name:
                p.requires_grad_(name in self.state.active)
        self.invalidate_graphs()  # the adapted graphs change; base captures could be kept, but are cheap

    def _add_weight_adapter(self, name: str, method, spec) -> None:
        model = self._model
        fqns = resolve_targets(spec, model, layer_kind)
        modules = dict(model.named_modules())
        layers = {fqn: describe_layer(fqn, modules[fqn]) for fqn in fqns}
        for layer in layers.values():  # validate everything before creating anything
            method.check(spec, layer)
        device = self.table.frozen[fqns[0] + ".weight"].device
        shared_tensors = method.init_shared(spec, list(layers.values()))
        shared = AdapterParams({k: v.to(device) for k, v in shared_tensors.items()},
                               method.buffer_names) if shared_tensors else None
        created = {}
        for fqn, layer in layers.items():
            weight = self.table.frozen[fqn + ".weight"]
            tensors = method.init_params(spec, layer, weight.t() if layer.transposed else weight)
            created[fqn] = (layer, AdapterParams(tensors, method.buffer_names))
        if shared is not None:
            self.shared[name] = shared
        for fqn, (layer, params) in created.items():
            key = slot_key(fqn)
            if key not in self.slots:
                self.slots[key] = AdapterSlot(layer, self.state)
            self.slots[key].add(name, method, params.to(self.table.frozen[fqn + ".weight"].device), shared)

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
        for holder in (self.graph_adapters, self.shared):
            if name in holder:
                del holder[name]
        self.table.method_state.pop(name, None)
        del self.state.specs[name]
        self.state.active = tuple(n for n in self.state.active if n != name)
        self.invalidate_graphs()

    def _saved_module_fqns(self, target: str) -> list[str]:
        modules = dict(self._model.named_modules())
        hits = [f for f in modules if f and (f == target or f.endswith("." + target))]
        if not hits:
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
        for name, _, _, p in self.table.tensors():
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
        entry = self._entry_for(args, kwargs)
        self._traced[_structure_key(self.training, args, kwargs)] = entry
        variant = self._variant(adapter_names)
        if adapter_names is not None:
            self.state.mixed = check_adapter_names(self.table, self._merged, adapter_names, args, kwargs)
        for name in self.state.active:
            method = method_for(self.state.specs[name])
            if isinstance(method, GraphMethod):
                method.before_call(self.table, name, self.training)
        try:
            return self._lowered(entry, variant)(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _traced_forward(self, args, kwargs, adapter_names):
        """forward under Dynamo: no capture, no nested torch.compile; the already-built graph is inlined."""
        entry = self._traced.get(_structure_key(self.training, args, kwargs))
        variant = self._variant(adapter_names)
        gm = None if entry is None else entry.graphs.get(variant)
        if gm is None:
            raise AdapterError(
                f"torch.compile(AdaptedModule): no {variant!r} graph for these inputs yet; call the module once "
                f"eagerly with inputs of this structure (or ac.compile(..., example_inputs=...)) before compiling."
            )
        if adapter_names is not None:
            self.state.mixed = check_adapter_names(self.table, self._merged, adapter_names, args, kwargs)
        try:
            return gm(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _variant(self, adapter_names=None) -> str:
        if adapter_names is not None:
            return "mixed"
        if not self._enabled:
            return "disabled"
        return "merged" if self._merged else "adapted"

    def _entry_for(self, args, kwargs) -> _Entry:
        key = (self.training, signature(args, kwargs))
        entries = self._graphs.setdefault(key, [])
        for entry in entries:
            if fits(entry.captured, args, kwargs):
                return entry
        mode = "train" if self.training else "eval"
        with status(f"capturing {type(self._model).__name__} ({mode}) with torch.export"):
            entry = _Entry(pipeline.capture(self._model, args, kwargs, self.training, self.table.frozen))
        entries.append(entry)
        COUNTERS["captures"] += 1
        return entry

    def _graph(self, entry: _Entry, variant: str) -> fx.GraphModule:
        if variant not in entry.graphs:
            entry.graphs[variant] = pipeline.build(entry.captured, self.table, variant)
        return entry.graphs[variant]

    def _lowered(self, entry: _Entry, variant: str):
        if variant not in entry.lowered:
            entry.lowered[variant] = pipeline.lower(self._graph(entry, variant), self.lowering, self.table, self.verify)
        return entry.lowered[variant]

    def capture(self, args=(), kwargs=None) -> None:
        """Capture and build the graph for this input structure in the current mode now, not on the first call."""
        args, kwargs = tuple(args), kwargs or {}
        entry = self._entry_for(args, kwargs)
        self._traced[_structure_key(self.training, args, kwargs)] = entry
        self._graph(entry, "adapted")

    def graph(self, args=(), kwargs=None, variant: str = "adapted") -> fx.GraphModule:
        """The (uncompiled) graph this module runs for these inputs in its current mode: the
        adapters, and the plan's decisions on each adapted layer's node (node.kwargs, node.meta)."""
        entry = self._entry_for(tuple(args), kwargs or {})
        return self._graph(entry, variant)

    def latest_graph(self, variant: str = "adapted") -> fx.GraphModule:
        """The most recently captured graph of the current mode (else of any mode)."""
        entries = [e for (training, _), es in self._graphs.items() if training == self.training for e in es]
        entries = entries or [e for es in self._graphs.values() for e in es]
        if not entries:
            raise AdapterError(
                "no graph captured yet: call the adapted module once, or pass example_inputs= to ac.compile()."
            )
        return self._graph(entries[-1], variant)

    def decisions(self, variant: str = "adapted") -> dict:
        """(layer FQN, adapter) -> the plan's Decision (order, FLOPs compared, ...) on the latest
        graph of the current mode; the same objects the graph's nodes carry."""
        return decisions_of(self.latest_graph(variant))

    # -- merge -----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapters into the (frozen copies of the) base weights."""
        if self._merged:
            return
        self._originals = merging.merge_into(self.table)
        self._merged = True

    def unmerge(self) -> None:
        """Restore the original weights bit-for-bit (kept, never recomputed)."""
        for fqn, original in self._originals.items():
            self.table.frozen[fqn].data = original
        self._originals = {}
        self._merged = False

    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def adapters_enabled(self) -> bool:
        return self._enabled

    def merged_module(self) -> nn.Module:
        """A plain module of the base architecture with the active adapters merged into its weights."""
        return merging.merged_copy(self.table, self._originals if self._merged else None)

    # -- adapters as files -------------------------------------------------------------------
    def save_adapter(self, path, adapter_name: str | None = None) -> None:
        checkpoint.save_adapter(self.table, path, adapter_name)

    def load_adapter(self, path, adapter_name: str = "default", hotswap: bool = False) -> None:
        spec, tensors, sub = checkpoint.read_adapter(path)  # read and validated before anything changes
        if hotswap:
            checkpoint.hotswap(self.table, adapter_name, spec, tensors, where=str(path), merged=self._merged)
            return
        self.add_adapter(adapter_name, spec, sub)
        try:
            checkpoint.load_adapter_state_dict(self.table, tensors, adapter_name, where=str(path))
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        return checkpoint.adapter_state_dict(self.table, adapter_name or self.state.active[0])

    def load_adapter_state_dict(self, state_dict, adapter_name: str | None = None) -> None:
        checkpoint.load_adapter_state_dict(self.table, state_dict, adapter_name or self.state.active[0])

    # -- method hooks --------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor:
        """Sum of the active adapters' regularisers (AdaLoRA, HRA orthogonality); 0 if none."""
        total = None
        for name in self.state.active:
            spec = self.state.specs[name]
            method = method_for(spec)
            pairs = [(s.layer, s.params(name)) for s in self.table.slots_of(name)]
            term = method.regularization_loss(spec, pairs) if hasattr(method, "regularization_loss") else None
            if term is not None:
                total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def xlora_scalings(self):
        """X-LoRA: the scalings (batch, seq, n_layers, n_experts) of the last call (PEFT's get_latest_scalings)."""
        for name in self.state.active:
            method = method_for(self.state.specs[name])
            if hasattr(method, "latest_scalings"):
                return method.latest_scalings(self.table, name)
        raise AdapterError("xlora_scalings: no active X-LoRA adapter.")

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation step (call after optimizer.step(), before zero_grad())."""
        done = False
        for name in self.state.active:
            method = method_for(self.state.specs[name])
            if hasattr(method, "update_and_allocate"):
                method.update_and_allocate(self.table, name, global_step)
                done = True
        if not done:
            raise AdapterError("update_and_allocate: no active AdaLoRA adapter.")

    def report(self, print_table: bool = False):
        graph = self.latest_graph() if self._graphs and self.state.specs else None
        workarounds = [w for es in self._graphs.values() for e in es for gm in e.graphs.values()
                       for w in gm.meta.get("ac_workarounds", ())]
        regions = [line for es in self._graphs.values() for e in es for gm in e.graphs.values()
                   for line in region_lines(gm.meta.get("ac_regions"))]
        rep = build_report(self.table, lowering_name(self.lowering), graph, self._checks(), workarounds, regions)
        if print_table:
            rep.print()
        return rep

    def _checks(self) -> list:
        """(graph description, guard verdict) of every compiled graph built so far."""
        out = []
        for (training, _), entries in self._graphs.items():
            for i, entry in enumerate(entries):
                for variant, fn in entry.lowered.items():
                    gm = entry.graphs[variant]
                    if "ac_guard" in gm.meta:
                        out.append((f"{'train' if training else 'eval'}/{variant}#{i}", gm.meta["ac_guard"]))
        return out

    def slots_of(self, adapter_name: str):
        return self.table.slots_of(adapter_name)

    def invalidate_graphs(self) -> None:
        self._graphs.clear()
        self._traced.clear()


def _structure_key(training: bool, args: tuple, kwargs: dict) -> tuple:
    """A key Dynamo can compute and hash (pytree specs it cannot): mode, arg count, kwarg names, ranks."""
    values = (*args, *kwargs.values())
    return training, len(args), tuple(kwargs), tuple(v.dim() if isinstance(v, torch.Tensor) else None for v in values)
