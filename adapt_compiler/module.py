"""AdaptedModule: the user-facing facade over the adapter table, the pipeline and the graph cache.

The user's model is never modified: base parameters are re-wrapped as frozen `nn.Parameter`s that
share storage with the user's tensors; merge swaps in new tensors and keeps the originals, so
unmerge restores them bit-for-bit without arithmetic. Everything the compiler reads lives in the
`AdapterTable` (`self.table`); graphs are built by `pipeline.build` and cached here per mode and
input structure, one per variant.

What Hugging Face clients read (config, the PeftModel surface, checkpointing, Trainer checks) lives
in `integrations/`, mixed in below; `ac.compile` returns an instance of a per-model subclass
(`integrations/adapted_class.py`) whose forward carries the model's signature.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import checkpoint, formats, pipeline
from .capture import Captured, compiled_flat, fits, memo_key, signature
from .compile_cache import LOADED as COMPILE_CACHE_LOADED
from .compile_cache import check_flag, files_to_save
from .counters import COUNTERS
from .errors import AdapterError
from .integrations.adapted_class import adapted_class
from .integrations.checkpointing import CheckpointingSurface
from .integrations.diffusers import DiffusersModelAttributes
from .integrations.generation import GenerationSupport
from .integrations.hf_model import HFModelAttributes, lift_scalar_inputs
from .integrations.model_view import routed_forward
from .integrations.peft_surface import PeftSurface, autocast_adapter, check_load_options, spec_of
from .integrations.trainer import check_driving_trainer
from .lowering import lowering_name
from .lowering import merge as merging
from .lowering.auto import tracing_here
from .lowering.gemv import GEMV
from .lowering.lifted import LIFTED
from .lowering.mixed import check_adapter_names
from .lowering.plan import decisions_of
from .lowering.prewarm import start_cpu_setup
from .lowering.pool import AdapterPool, pool_indices
from .lowering.slots import AdapterSlot, SavedModuleSlot
from .names import slot_key
from .passes import GraphMethod, method_for
from .passes.method import BASE_WEIGHT
from .passes._lora_init import initialiser_for, rng_state
from .passes.lora import DATA_INITS, LoRA, data_pass_missing
from .passes.match import describe_layer, layer_kind, target_layers
from .progress import status
from .quant import KINDS as QUANT_KINDS
from .quant import check_method as check_quantized_method
from .quant import describe as describe_quantized
from .quant import known_layers, operand_key
from .quant.weight import frozen_weight
from .report import build_report, region_lines
from .spec import resolve_targets
from .table import AdapterParams, AdapterState, AdapterTable
from .targeting import default_targets


@dataclass
class _Entry:
    """The graphs of one capture (mode + input structure), built and lowered lazily per variant."""

    captured: Captured
    expects: object = None  # target FQN -> whether this graph must run it (a part of the model); None: all
    flat: bool = False  # compiled over flat leaves (calls that carry a KV cache: lowering/step.py)
    graphs: dict = field(default_factory=dict)  # (variant, recompute key) -> GraphModule
    lowered: dict = field(default_factory=dict)  # (variant, recompute key) -> callable


class _Disabled(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.enable_adapters()
        return False


class AdaptedModule(DiffusersModelAttributes, HFModelAttributes, GenerationSupport, PeftSurface, CheckpointingSurface, nn.Module):
    def __init__(self, model: nn.Module, specs: dict, lowering: str = "inductor", sub_adapters: dict | None = None,
                 verify: bool = True, memory_budget: float | None = None, example_inputs: tuple | None = None,
                 pool: dict | None = None):
        nn.Module.__init__(self)  # not super(): with PeftModel as a base (adapted_class.py) its __init__ must not run
        self.__dict__["_example"] = example_inputs  # (args, kwargs): finds default targets in a graph if needed
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
        quant = {fqn: describe_quantized(mod, _float_dtype(model)) for fqn, mod in known_layers(model).items()}
        self.__dict__["table"] = AdapterTable(model, self._freeze_base(model, quant), AdapterState(), self.slots,
                                              self.saved, self.graph_adapters, self.shared, quant=quant)
        self._originals: dict[str, torch.Tensor] = {}  # merged FQN -> original data
        self._graphs: dict = {}  # (root, training, input signature) -> [_Entry]; root "" = the whole model
        self._traced: dict = {}  # simple structure key -> entry of the last eager call (see _traced_forward)
        self._memo: dict = {}  # an input rule's cheap key -> (weakrefs of the objects it names, entry)
        self._enabled = True
        self._merged = False
        self.table.recompute.memory_budget = memory_budget
        self.table.recompute.by_blocks = lowering != "inductor"  # Inductor takes the budget itself
        self._pool_active = None  # the pool adapter set_adapter chose, if any
        self._compile_cache_line = None  # report(): what ac.compile did with a compile cache (compile_cache.py)
        if pool is not None:  # ac.compile(..., max_adapters=N, max_rank=r): a pool over the specs' targets
            fqns = [f for spec in specs.values() if not isinstance(method_for(spec), GraphMethod)
                    for f in resolve_targets(spec, model, layer_kind)]
            self._reserve(list(dict.fromkeys(fqns)), **pool)
        for name, spec in specs.items():
            self.add_adapter(name, spec, (sub_adapters or {}).get(name))
        self.set_adapter(next(iter(specs)))
        self.train(model.training)  # start in the user's model's mode

    @property
    def state(self) -> AdapterState:
        return self.table.state

    # -- construction --------------------------------------------------------------------
    def _freeze_base(self, model: nn.Module, quant: dict) -> dict[str, torch.Tensor]:
        """FQN -> frozen tensor sharing storage with the model's. Quantized layers (`quant`: FQN ->
        QuantInfo) add their op's operands (scales, ...) as `<fqn>.weight__<operand>`, read now: a later
        change to the user's layer (bitsandbytes repacks 4-bit weights in place for CPU inference)
        does not reach our graphs."""
        frozen, by_id, names = {}, {}, {}
        modules = dict(model.named_modules())
        operands = [(operand_key(fqn, name), nn.Parameter(t, requires_grad=False))
                    for fqn, info in quant.items()
                    for name, t in QUANT_KINDS[info.kind].operands(modules[fqn]).items()
                    if t is not None and name != "weight"]
        for fqn, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False),
                       *operands]:
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
        before = [(t.dtype, t.device) for t in self.table.frozen.values()]
        super()._apply(fn, recurse)
        frozen = self.table.frozen
        for fqn, name in self._base_names.items():  # buffers are new tensor objects after _apply
            frozen[fqn] = getattr(self.base, name)
        self._originals = {k: fn(v) for k, v in self._originals.items()}
        self.table.base_originals = {a: {k: fn(v) for k, v in d.items()} for a, d in self.table.base_originals.items()}
        if before != [(t.dtype, t.device) for t in frozen.values()]:  # Trainer's .to(device) on the same device
            self.invalidate_graphs()
        return self

    def add_adapter(self, name: str, spec, sub_adapters: dict | None = None, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Create an adapter's parameters now (users build the optimizer before the first call).
        `spec`: an adapter spec, or a peft.PeftConfig (PEFT's spelling; then, as in PEFT, a float16/
        bfloat16 adapter is made float32 unless autocast_adapter_dtype=False). The new adapter is
        not activated. `sub_adapters`: a graph method's sub-adapters (checkpoint.read_sub_adapters).
        With a serving pool (reserve), a plain low-rank adapter goes into a free slot instead."""
        spec, from_peft = spec_of(spec)
        self._add_adapter(name, spec, sub_adapters)
        if from_peft and autocast_adapter_dtype:
            autocast_adapter(self.table, name)

    def _add_adapter(self, name: str, spec, sub_adapters: dict | None = None) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without dots.")
        if name in self.table.names():
            raise AdapterError(f"adapter {name!r} already exists; pick another name or delete_adapter({name!r}).")
        if self._into_pool(name, spec):
            return
        method = method_for(spec)
        for target in spec.modules_to_save or []:  # validated before anything is created
            self._saved_module_fqns(target)
        if isinstance(method, GraphMethod) and self.table.quant:
            fqn, info = next(iter(self.table.quant.items()))
            raise AdapterError(
                f"{type(spec).__name__} over a quantized base ({fqn} is {info.scheme}) is not supported yet; "
                f"over quantized layers use a weight method (LoRA, DoRA, AdaLoRA, OFT, ...)."
            )
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
            spec = method.resolve_spec(spec, self._model)
            if spec.targets is None:  # PEFT's table for the model type, else the attention in a captured graph
                spec = spec.replace(targets=default_targets(method.name, self._model, self._example))
            self._add_weight_adapter(name, method, spec)
        for fqn in spec.modules_to_save or []:
            self._add_saved_module(name, fqn)
        self.state.specs[name] = spec
        for n, p in self._adapter_tensors():  # like PEFT: an adapter that is not active is frozen
            if n == name:
                p.requires_grad_(name in self.state.active)
        self.invalidate_graphs()  # the adapted graphs change; base captures could be kept, but are cheap

    def _add_weight_adapter(self, name: str, method, spec) -> None:
        layers = target_layers(method, spec, self._model, self.table.quant)
        for layer in layers.values():  # validate everything before creating anything
            method.check(spec, layer)
            if layer.quant is not None:
                self._check_quantized(method, spec, layer)
        frozen = self.table.frozen
        device = frozen[next(iter(layers.values())).weight_fqn].device
        found = initialiser_for(getattr(spec, "init", None))
        rng = rng_state(device) if found is not None and found[0].rng else None  # before anything is drawn
        shared_tensors = method.init_shared(spec, list(layers.values()))
        shared = AdapterParams({k: v.to(device) for k, v in shared_tensors.items()},
                               method.buffers(spec)) if shared_tensors else None
        created, bases = {}, {}
        for fqn, layer in layers.items():
            if layer.quant is not None:  # methods initialise from W: dequantized for this call only
                weight = frozen_weight(layer.quant, self._operands(fqn), layer.dtype).dequantize()
            else:
                weight = frozen[layer.weight_fqn]
            tensors = method.init_params(spec, layer, weight.t() if layer.transposed else weight)
            base = tensors.pop(BASE_WEIGHT, None)  # PiSSA / OLoRA / CorDA: the residual W − s·B₀A₀
            if base is not None and layer.quant is not None:
                raise AdapterError(
                    f"{fqn}: init={getattr(spec, 'init', None)!r} replaces the base weight by a residual, and this is a "
                    f"{layer.quant.scheme} layer whose packed weight we do not re-quantize; use init=True or 'loftq' "
                    f"over a quantized base.")
            if base is not None:
                bases[layer.weight_fqn] = (base.t() if layer.transposed else base).contiguous()
            created[fqn] = (layer, AdapterParams(tensors, method.buffers(spec)))
        self._set_residual_bases(name, bases)
        if shared is not None:
            self.shared[name] = shared
        for fqn, (layer, params) in created.items():
            key = slot_key(fqn)
            if key not in self.slots:
                self.slots[key] = AdapterSlot(layer, self.state)
            self.slots[key].add(name, method, params.to(frozen[layer.weight_fqn].device), shared)
        if getattr(spec, "init", None) in DATA_INITS:  # EVA / CorDA / LoRA-GA: placeholders until their data pass
            self.table.data_init[name] = spec.init
            if rng is not None:
                self.table.data_init_rng[name] = rng

    def _set_residual_bases(self, name: str, bases: dict) -> None:
        """Weight FQN -> the residual base an init (PiSSA, OLoRA, CorDA) puts under adapter `name`: into our
        frozen copy (the user's tensor keeps its storage); the originals are kept and delete_adapter restores them."""
        frozen = self.table.frozen
        originals = self.table.base_originals.setdefault(name, {})
        for w, base in bases.items():
            originals.setdefault(w, frozen[w].data)
            frozen[w].data = base.to(device=frozen[w].device, dtype=frozen[w].dtype)
        if not originals:
            del self.table.base_originals[name]
        self.invalidate_graphs()

    def _check_quantized(self, method, spec, layer) -> None:
        """Refuse, by name, a method PEFT does not support over this quantized layer, or one whose
        forward needs the whole weight matrix (a full-precision copy of the quantized weight)."""
        label = "DoRA" if getattr(spec, "use_dora", False) else type(spec).__name__
        check_quantized_method(layer.quant, layer.fqn, method.name, label)
        if method.reads_dense_weight(spec):
            raise AdapterError(
                f"{layer.fqn}: {label} with these settings rebuilds the whole weight matrix from W in every forward, "
                f"a full-precision copy of the {layer.quant.scheme} weight; not supported over a quantized base. "
                f"Fix: use its default variant, or another method."
            )

    def _operands(self, fqn: str) -> dict:
        """Operand name -> frozen tensor (or None) of quantized layer `fqn`."""
        info = self.table.quant[fqn]
        return {name: self.table.frozen.get(operand_key(fqn, name)) for name in info.operands}

    def delete_adapter(self, name: str) -> None:
        if self.table.pool is not None and name in self.table.pool:  # frees the slot: nothing recompiles
            self.table.pool.delete(name)
            self._pool_active = None if self._pool_active == name else self._pool_active
            return
        if name not in self.state.specs:
            raise AdapterError(f"delete_adapter: no adapter named {name!r}; known: {self.table.names()}.")
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
        for w, original in self.table.base_originals.pop(name, {}).items():  # undo a residual init
            self.table.frozen[w].data = original
        self.table.data_init.pop(name, None)
        self.table.data_init_rng.pop(name, None)
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

    # -- the serving pool ---------------------------------------------------------------------
    def reserve(self, max_adapters: int, max_rank: int, targets=None, evict: bool = False) -> None:
        """A serving pool: `max_adapters` slots for LoRA adapters of rank <= `max_rank` on `targets`
        (module-name suffixes or a regex, as in a spec; default: the layers the adapters so far adapt).
        The graphs are captured and compiled once more now, and never again for the pool: `load_adapter` /
        `add_adapter` of a new LoRA name fills a free slot, `delete_adapter` frees it, and mixed batches
        index the slots (lowering/pool.py). `evict=True`: a full pool drops its least recently used adapter."""
        if targets is None:
            fqns = [s.layer.fqn for s in self.slots.values() if s.layer.kind == "linear"]
        else:
            fqns = resolve_targets(LoRA(r=max_rank, targets=targets), self._model, layer_kind)
        if not fqns:
            raise AdapterError("reserve: no target layers; pass targets=[...] (module-name suffixes).")
        self._reserve(fqns, max_adapters, max_rank, evict)
        self.invalidate_graphs()

    def _reserve(self, fqns: list, max_adapters: int, max_rank: int, evict: bool = False) -> None:
        if self.table.pool is not None:
            raise AdapterError("reserve: this module has a pool already.")
        modules = dict(self._model.named_modules())
        layers = {fqn: describe_layer(fqn, modules[fqn]) for fqn in fqns}
        device = self.table.frozen[fqns[0] + ".weight"].device
        self.pool = AdapterPool(layers, max_adapters, max_rank, self.state, device, evict)
        self.table.pool = self.pool

    def _into_pool(self, name: str, spec, tensors: dict | None = None, where: str = "spec") -> bool:
        """Put a plain low-rank adapter into a pool slot (validated first); False if it is not one."""
        if self.table.pool is None:
            return False
        operands = checkpoint.low_rank_operands(self.table, name, spec, tensors, where)
        if not operands or any(v is None for v in operands.values()):
            return False  # not plain low-rank (DoRA, another method): a regular adapter
        self.table.pool.check(name, spec, method_for(spec), operands)
        self.table.pool.put(name, spec, operands)
        return True

    # -- adapter selection -----------------------------------------------------------------
    @property
    def active_adapters(self) -> tuple[str, ...]:
        return (self._pool_active,) if self._pool_active is not None else self.state.active

    def adapter_names_known(self) -> set[str]:
        """Every adapter name a call may use (adapter_names=, set_adapter)."""
        return set(self.table.names())

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        """Activate these adapters; their tensors require grad (unless `inference_mode`), the others are frozen."""
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in self.table.names()]
        if unknown:
            raise AdapterError(f"set_adapter: unknown adapter(s) {unknown}; known: {self.table.names()}.")
        if self._merged:
            raise AdapterError("set_adapter: unmerge() first; the weights hold the merged adapter.")
        pooled = [n for n in names if n not in self.state.specs]
        if pooled and len(names) > 1:
            raise AdapterError(f"set_adapter: {pooled} are pool adapters; activate one at a time (or use "
                               f"adapter_names=[...] per sample).")
        self._pool_active = pooled[0] if pooled else None
        names = () if pooled else names
        self.state.active = names
        for name, p in self._adapter_tensors():
            p.requires_grad_(name in names and not inference_mode)

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
        routed = routed_forward(self)  # a client replaced get_base_model().forward (TRL): PeftModel calls it
        if routed is not None and not tracing_here():
            extra = {} if adapter_names is None else {"adapter_names": adapter_names}
            return routed(*args, **extra, **kwargs)
        return self._forward_at("", args, kwargs, adapter_names)

    def _forward_at(self, root, args: tuple, kwargs: dict, adapter_names=None):
        """Run the adapted graph of `root` on these inputs: "" = the whole model, a submodule path
        (model_view.py), or (name, module, expects): capture `module` instead of the whole model (e.g. an
        encoder view with the model's own parameter names, integrations/generation.py), where
        `expects(fqn)` says which target layers that graph must run (others may be absent from it)."""
        kwargs = lift_scalar_inputs(kwargs)
        if tracing_here():  # torch.compile(m): Dynamo traces the graph an eager call built
            return self._traced_forward(args, kwargs, adapter_names, _root_name(root))
        if self.training:
            check_driving_trainer(self)  # Trainer options we cannot honour, refused by name
        pending = [n for n in self.state.active if n in self.table.data_init]
        if pending:
            raise AdapterError(data_pass_missing(pending[0], self.table.data_init[pending[0]]))
        entry = self._entry_for(args, kwargs, root)
        self._traced[_structure_key(self.training, args, kwargs, _root_name(root))] = entry
        variant = self._variant(adapter_names)
        if adapter_names is not None:
            self.state.mixed = check_adapter_names(self.table, self._merged, adapter_names, args, kwargs)
        if self.table.pool is not None:  # each sample's pool slot: data, so nothing recompiles
            self.state.pool_index = pool_indices(self.table.pool, self._pool_active, adapter_names, args, kwargs)
        self._before_call()
        try:
            return self._lowered(entry, variant)(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _traced_forward(self, args, kwargs, adapter_names, root: str = ""):
        """forward under Dynamo: no capture, no nested torch.compile; the already-built graph is inlined."""
        entry = self._traced.get(_structure_key(self.training, args, kwargs, root))
        variant = self._variant(adapter_names)
        gm = None if entry is None else entry.graphs.get(self._graph_key(variant))
        if gm is None:
            raise AdapterError(
                f"torch.compile(AdaptedModule): no {variant!r} graph for these inputs yet; call the module once "
                f"eagerly with inputs of this structure (or ac.compile(..., example_inputs=...)) before compiling."
            )
        if adapter_names is not None:
            self.state.mixed = check_adapter_names(self.table, self._merged, adapter_names, args, kwargs)
        for name in self.state.active:  # per-call adapter state, on every call (see before_traced_call)
            method_for(self.state.specs[name]).before_traced_call(self.table, name, self.training)
        try:
            return gm(*args, **kwargs)
        finally:
            self.state.mixed = None

    def _before_call(self) -> None:
        """Each active method's per-call hook (WeightMethod.before_call), before the graph runs."""
        for name in self.state.active:
            method_for(self.state.specs[name]).before_call(self.table, name, self.training)

    def _variant(self, adapter_names=None) -> str:
        if adapter_names is not None and self.state.specs:  # (pool adapters alone: the pool's index serves)
            return "mixed"
        if not self._enabled:
            return "disabled"
        return "merged" if self._merged else "adapted"

    def _entry_for(self, args, kwargs, root="") -> _Entry:
        memo = memo_key(args, kwargs)  # e.g. the next decode step of the same static KV cache: no flattening
        name = _root_name(root)
        if memo is not None:
            hit = self._memo.get((self.training, name, memo[0]))
            if hit is not None and all(ref() is obj for ref, obj in zip(hit[0], memo[1])):
                return hit[1]
        entry = self._find_or_capture(args, kwargs, root)
        if memo is not None:
            if len(self._memo) >= 16:
                self._memo.pop(next(iter(self._memo)))
            self._memo[(self.training, name, memo[0])] = ([weakref.ref(o) for o in memo[1]], entry)
        return entry

    def _find_or_capture(self, args, kwargs, root) -> _Entry:
        key = (_root_name(root), self.training, signature(args, kwargs))
        entries = self._graphs.setdefault(key, [])
        for entry in entries:
            if fits(entry.captured, args, kwargs):
                return entry
        mode = "train" if self.training else "eval"
        self._start_cpu_setup()  # if ac.compile has not: overlaps Inductor's set-up with this capture
        if isinstance(root, str):
            what = type(self._model).__name__ + (f".{root}" if root else "")
            with status(f"capturing {what} ({mode}) with torch.export"):
                entry = _Entry(pipeline.capture(self._model, args, kwargs, self.training, self.table.frozen, root,
                                                self.table.quant),
                               None, compiled_flat(args, kwargs))
        else:
            with status(f"capturing {type(root[1]).__name__} ({mode}) with torch.export"):
                entry = _Entry(pipeline.capture(root[1], args, kwargs, self.training, self.table.frozen),
                               root[2], compiled_flat(args, kwargs))
        entries.append(entry)
        COUNTERS["captures"] += 1
        return entry

    def _start_cpu_setup(self) -> None:
        """Start Inductor's once-per-process CPU set-up in a background thread (lowering/prewarm.py) when
        this module's graphs will be compiled for the CPU; a loaded compile cache holds the kernels, so
        then only the ISA probe (no kernel compile, no header to build)."""
        if self.lowering in ("inductor", "regional", "auto") and self.device.type == "cpu":
            start_cpu_setup(kernels=not (self._compile_cache_line or "").startswith(COMPILE_CACHE_LOADED))

    def _graph(self, entry: _Entry, variant: str) -> fx.GraphModule:
        key = self._graph_key(variant)
        if key not in entry.graphs:
            entry.graphs[key] = pipeline.build(entry.captured, self.table, variant, entry.expects)
        return entry.graphs[key]

    def _graph_key(self, variant: str) -> tuple:
        """A capture's graphs differ by variant and, in training, by the checkpointing settings
        (toggling them, as TRL's DPO does around its reference pass, finds the graphs built before)."""
        return variant, self.table.recompute.key() if self.training else None

    def _lowered(self, entry: _Entry, variant: str):
        key = self._graph_key(variant)
        if key not in entry.lowered:
            lower = pipeline.lower_flat if entry.flat else pipeline.lower
            entry.lowered[key] = lower(self._graph(entry, variant), self.lowering, self.table, self.verify)
        return entry.lowered[key]

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
        entries = [e for (_, training, _), es in self._graphs.items() if training == self.training for e in es]
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
        if self._pool_active is not None:
            raise AdapterError(f"merge: {self._pool_active!r} is served from the adapter pool, which stays unmerged; "
                               f"set a regular adapter active to merge.")
        merging.check_unquantized(self.table, "merge()")
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

    def merged_module(self, requantize: bool = False) -> nn.Module:
        """A plain module of the base architecture with the active adapters merged into its weights.

        Over a quantized base: every quantized layer becomes an `nn.Linear` holding its dequantized
        (and, where adapted, merged) weight in the layer's own dtype; or, with `requantize=True`, a new
        quantized layer of the same kind holding W + ΔW re-quantized (PEFT's merge_and_unload), with a
        warning that reports how much of each adapter's update the rounding kept."""
        return merging.merged_copy(self.table, self._originals if self._merged else None, requantize=requantize)

    # -- adapters as files -------------------------------------------------------------------
    def save_adapter(self, path, adapter_name: str | None = None, format: str = "peft",
                     component: str | None = None, compile_cache: bool = False) -> None:
        """format: "peft" (a directory PEFT loads), "kohya" (a kohya/LyCORIS .safetensors file) or
        "diffusers" (save_lora_weights' layout); `component`: the pipeline model it is for (default from
        the model's class: "unet", "transformer", "text_encoder"). `compile_cache=True` (PEFT directories):
        also the compile caches of the graphs compiled so far, for a warm start with
        `ac.compile(model, path, compile_cache=True)` (compile_cache.py)."""
        extra = None
        if check_flag(compile_cache, "save_adapter") and format == "peft":
            compiled = any(e.lowered for es in self._graphs.values() for e in es)
            extra = files_to_save(self.table, self._compile_options(), compiled,  # refuses before writing
                                  self._passed_verdicts())
        elif compile_cache:
            extra = {}  # formats.save_adapter refuses it by name for single-file formats
        formats.save_adapter(self.table, path, adapter_name, format=format, component=component, extra_files=extra)

    def _passed_verdicts(self) -> dict:
        """Graph fingerprint -> the guard's verdict, for each compiled graph whose compiled code passed the
        check (or reused a passed verdict) and serves it: what a warm start may reuse (lowering/guard.py)."""
        out = {}
        for (_, training, _), entries in self._graphs.items():
            for i, entry in enumerate(entries):
                for variant, k in entry.lowered:
                    gm = entry.graphs[variant, k]
                    v, fp = gm.meta.get("ac_guard"), gm.meta.get("ac_guard_fingerprint")
                    if v is not None and fp and v.status in ("passed", "reused") and v.lowering != "eager":
                        out[fp] = {"graph": f"{'train' if training else 'eval'}/{variant}#{i}",
                                   "compared": v.compared, "worst": v.worst}
        return out

    def _compile_options(self) -> dict:
        """The compile options a compile cache is keyed on (compile_cache.cache_key)."""
        pool = self.table.pool
        return {"lowering": lowering_name(self.lowering), "merged": self._merged,
                "memory_budget": self.table.recompute.memory_budget,
                "pool": None if pool is None else [pool.capacity, pool.rank, sorted(pool.layers)]}

    def load_adapter(self, path, adapter_name: str = "default", is_trainable: bool = False, hotswap: bool = False,
                     component: str | None = None, **peft_options) -> None:
        """Load an adapter (a PEFT directory, or a kohya/LyCORIS or diffusers file: formats/), with
        PeftModel.load_adapter's meaning: a new name adds the
        adapter (not activated; trainable only with `is_trainable`), an existing name is overwritten
        in place (same tensors, so the optimizer and compiled graphs stay valid: Trainer's resume),
        and `is_trainable=False` puts the module in eval mode, as PEFT does. `hotswap=True` replaces
        an adapter's weights without recompiling (a smaller rank is zero-padded). PEFT's other
        options are honoured or refused by name (integrations/peft_surface.py)."""
        autocast = check_load_options(peft_options, self.device)
        # read and validated before anything changes; single-file formats against the model (formats/)
        spec, tensors, sub = formats.read_adapter(path, self._model, component)
        pool = self.table.pool
        if pool is not None and (adapter_name in pool or adapter_name not in self.state.specs):
            if adapter_name in pool and not hotswap:
                raise AdapterError(f"adapter {adapter_name!r} already exists; pass hotswap=True to replace its "
                                   f"weights, or delete_adapter({adapter_name!r}) first.")
            if self._into_pool(adapter_name, spec, tensors, str(path)):
                return
        if hotswap:
            checkpoint.hotswap(self.table, adapter_name, spec, tensors, where=str(path), merged=self._merged)
            checkpoint.warn_if_quantization_differs(self.table, adapter_name, path)
            return
        if adapter_name in self.state.specs:
            checkpoint.overwrite(self.table, adapter_name, spec, tensors, sub, where=str(path), merged=self._merged)
        else:
            self._add_adapter(adapter_name, spec, sub)
            try:
                checkpoint.load_adapter_state_dict(self.table, tensors, adapter_name, where=str(path))
            except Exception:
                self.delete_adapter(adapter_name)
                raise
            if autocast:
                autocast_adapter(self.table, adapter_name)
            if is_trainable:
                self.set_requires_grad(adapter_name, True)
        if not is_trainable:
            self.eval()
        checkpoint.warn_if_quantization_differs(self.table, adapter_name, path)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        return checkpoint.adapter_state_dict(self.table, adapter_name or self.active_adapters[0])

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
        auto = [f"{'train' if training else 'eval'}/{variant}#{i}: {e.graphs[variant, k].meta['ac_auto'].summary()}"
                for (_, training, _), es in self._graphs.items() for i, e in enumerate(es)
                for (variant, k) in e.lowered if "ac_auto" in e.graphs[variant, k].meta]  # lowering="auto": the switch
        gemv = [f"{'train' if training else 'eval'}/{variant}#{i}: {e.graphs[variant, k].meta[key]}"
                for (_, training, _), es in self._graphs.items() for i, e in enumerate(es)
                for (variant, k) in e.lowered for key in (LIFTED, GEMV) if key in e.graphs[variant, k].meta]
        rep = build_report(self.table, lowering_name(self.lowering), graph, self._checks(), workarounds, regions,
                           self.__dict__.get("_compile_cache_line"), auto, gemv)  # absent in pickles made before it
        if print_table:
            rep.print()
        return rep

    def _checks(self) -> list:
        """(graph description, guard verdict) of every compiled graph built so far."""
        out = []
        for (_, training, _), entries in self._graphs.items():
            for i, entry in enumerate(entries):
                for (variant, _), fn in entry.lowered.items():
                    gm = entry.graphs[variant, _]
                    if "ac_guard" in gm.meta:
                        out.append((f"{'train' if training else 'eval'}/{variant}#{i}", gm.meta["ac_guard"]))
        return out

    def slots_of(self, adapter_name: str):
        return self.table.slots_of(adapter_name)

    def invalidate_graphs(self) -> None:
        self._graphs.clear()
        self._traced.clear()
        self._memo.clear()

    # -- pickling: torch.save(m), torch.load(..., weights_only=False), copy.deepcopy(m) -----------------
    def __reduce_ex__(self, protocol):
        """The per-model class is made at run time (integrations/adapted_class.py): name the factory."""
        cls = type(self)
        if "_adapted_model_class" not in cls.__dict__:
            return super().__reduce_ex__(protocol)
        return rebuild, (cls._adapted_model_class, cls._adapted_with_peft), self.__getstate__()

    def __getstate__(self):
        """Graphs and compiled callables are not saved (they are captured again on the first call),
        nor the view a client may have patched (model_view.py). Frozen tensors that share storage
        with the user's model are recorded, so that a copy shares storage with its copy of the model."""
        state = nn.Module.__getstate__(self)
        state["_graphs"], state["_traced"] = {}, {}
        state.pop("_hf_view", None)
        own = {fqn: t for fqn, t in self._model.named_parameters(remove_duplicate=False)}
        state["_ac_aliases"] = {name: fqn for fqn, name in self._base_names.items()
                                if fqn in own and _same_storage(getattr(self.base, name), own[fqn])}
        return state

    def __setstate__(self, state) -> None:
        aliases = state.pop("_ac_aliases", {})
        nn.Module.__setstate__(self, state)
        own = dict(self._model.named_parameters(remove_duplicate=False))
        for name, fqn in aliases.items():
            getattr(self.base, name).data = own[fqn].detach()


def rebuild(model_cls: type, with_peft: bool):
    """Unpickling: an empty instance of the per-model class; __setstate__ fills it."""
    cls = adapted_class(AdaptedModule, model_cls, with_peft)
    return cls.__new__(cls)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _root_name(root) -> str:
    """The graph-cache name of a root: a submodule path, or a view's name (see _forward_at)."""
    return root if isinstance(root, str) else root[0]


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The model's float dtype: that of its first floating-point parameter (for quantized kinds that
    keep no dtype of their own, e.g. bitsandbytes int8)."""
    for p in model.parameters():
        if p.is_floating_point() and type(p) is nn.Parameter:
            return p.dtype
    return torch.get_default_dtype()


def _structure_key(training: bool, args: tuple, kwargs: dict, root: str = "") -> tuple:
    """A key Dynamo can compute and hash (pytree specs it cannot): mode, arg count, kwarg names, ranks."""
    values = (*args, *kwargs.values())
    ranks = tuple(v.dim() if isinstance(v, torch.Tensor) else None for v in values)
    return root, training, len(args), tuple(kwargs), ranks
