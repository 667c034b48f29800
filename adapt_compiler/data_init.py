"""Data-driven LoRA initialisations: EVA's and CorDA's passes over the user's data.

PEFT runs these with forward hooks on the user's modules (`initialize_lora_eva_weights`,
`preprocess_corda`) and then rewrites the model (new ranks, a residual base weight). Here the user's
model is never touched: the pass runs *our* captured graph, eager (the FX graph as is, in eval mode,
no compile), and reads each adapted layer's input where the graph hands it to the layer's AdapterSlot
(a forward hook on our slot module: `args[0]` is exactly the tensor the layer multiplies). While the pass
runs no adapter is active, so every slot computes its base layer and the slot inputs are the base model's
activations, as under PEFT's `disable_adapter()` (EVA) or before `get_peft_model` (CorDA).

What each pass leaves:
- EVA: the adapter re-created with the ranks EVA chose (rank_pattern / alpha_pattern with the layers'
  FQNs, like PEFT's; layers that got rank 0 leave `targets`), lora_A = the components, lora_B = 0.
  The base is unchanged. The saved config says init_lora_weights="eva", as PEFT's does.
- CorDA: lora_A / lora_B from the decomposition, in place (same tensors: an optimizer built before
  stays valid), and the layer's frozen weight in *our* copy replaced by the residual W − s·B₀A₀
  (`table.base_originals` keeps W; delete_adapter restores it). `m.report()` lists the replaced weights.

The math is in passes/_lora_init_eva.py and passes/_lora_init_corda.py.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import AdapterError
from .integrations.hf_model import lift_scalar_inputs
from .names import slot_key
from .passes._lora_init_corda import corda_config_of, corda_factors, crop, eigens, sample_covariance
from .passes._lora_init_eva import LayerPCA, eva_config_of, rank_distribution
from .passes._patterns import pattern_value
from .passes.lora import LoRA, rank_of, scaling_of


# -- PEFT's default input preparation for language modelling (eva.py), same names and meaning ----------
def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """The (batch, position) indices whose tokens count: attention_mask, and with eva_config.use_label_mask
    the positions whose label is not label_mask_value."""
    if not isinstance(model_input, dict):
        raise AdapterError("EVA: the default prepare_model_inputs_fn reads a dict batch (input_ids, attention_mask, "
                           "labels); pass prepare_model_inputs_fn=None (and prepare_layer_inputs_fn=None) for other "
                           "batches, or your own functions.")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer input's rows at the indices prepare_model_inputs_fn chose: (tokens, features)."""
    return _first(layer_input, layer_name)[model_input.T.unbind()]


def _prepare_layer_inputs_flat(layer_input, model_input, layer_name) -> torch.Tensor:
    """PEFT's fallback (prepare_layer_inputs_fn=None): every position, flattened to (tokens, features)."""
    x = _first(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def _first(layer_input, layer_name):
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise AdapterError(f"EVA: unsupported layer input type {type(layer_input).__name__} in {layer_name}; pass a "
                       f"prepare_layer_inputs_fn.")


def forward_fn_dict(model, inputs):
    """PEFT's default forward_fn: model(**inputs)."""
    return model(**inputs)


# -- running our graph and reading the slots' inputs -------------------------------------------------
class _EagerGraph:
    """Calls `m`'s adapted graph for the inputs' structure as the FX graph itself (the eager lowering),
    whatever lowering `m` compiles with: the slots stay modules that forward hooks see."""

    def __init__(self, m, run=None):
        self.m, self.run = m, run

    def __call__(self, *args, **kwargs):
        kwargs = lift_scalar_inputs(kwargs)
        if self.run is not None:  # the call's (batch, sequence): HF Conv1D layers see their input flattened
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
            self.run.lead = None if first is None else tuple(first.shape[:2])
        return self.m.graph(args, kwargs)(*args, **kwargs)


class _DataPass:
    """The context of one pass: eval mode, no grad, no adapter active, hooks removed at the end."""

    def __init__(self, m, name: str):
        self.m, self.name = m, name
        self.handles = []

    def __enter__(self):
        m = self.m
        if m.merged:
            raise AdapterError("data pass: the module is merged; unmerge() first.")
        self.training, self.active = m.training, m.state.active
        self.grad = torch.is_grad_enabled()
        m.eval()
        # no adapter active: every slot computes the base layer (PEFT runs under disable_adapter(), or on the
        # model before get_peft_model), and still sees its input. A CorDA adapter loaded from a checkpoint
        # holds trained factors here, which must not shift the activations
        m.set_adapter(())
        torch.set_grad_enabled(False)
        return self

    def hook(self, fqn: str, fn) -> None:
        """fn(x) on every call of layer `fqn`: its input, as the graph hands it to the slot. An HF Conv1D
        flattens its input to (tokens, features) before its addmm, so the slot sees it flat; PEFT's hooks see
        the module's input (batch, seq, features), which is the flat one viewed back at the call's shape."""
        slot = self.m.slots[slot_key(fqn)]

        def read(module, args, out):
            x = args[0]
            lead = getattr(self, "lead", None)
            if slot.layer.transposed and x.dim() == 2 and lead is not None and x.shape[0] == math.prod(lead):
                x = x.view(*lead, x.shape[-1])
            fn(x)  # returns None: the layer's output is left as it is

        self.handles.append(slot.register_forward_hook(read))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        torch.set_grad_enabled(self.grad)
        if self.active:
            self.m.set_adapter(self.active)
        self.m.train(self.training)
        return False


def _adapter(m, name: str, init: str):
    if name not in m.state.specs:
        raise AdapterError(f"no adapter named {name!r}; known: {list(m.state.specs)}.")
    spec = m.state.specs[name]
    if not isinstance(spec, LoRA) or spec.init != init:
        raise AdapterError(f"adapter {name!r} does not have init={init!r} (PEFT's init_lora_weights); create it with "
                           f"ac.LoRA(init={init!r}, ...).")
    return spec


def _layers(m, name: str) -> list:
    """The adapter's layers in the model's module order (the order PEFT's hooks see them)."""
    order = {fqn: i for i, (fqn, _) in enumerate(m.get_base_model().named_modules())}
    layers = [s.layer for s in m.table.slots_of(name)]
    return sorted(layers, key=lambda layer: order.get(layer.fqn, len(order)))


def _to(inputs, device):
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _call(forward_fn, runner, inputs):
    if forward_fn is not None:
        return forward_fn(runner, inputs)
    if isinstance(inputs, Mapping):
        return runner(**inputs)
    return runner(*inputs) if isinstance(inputs, (tuple, list)) else runner(inputs)


def _check_not_distributed(gather: bool, what: str) -> None:
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise AdapterError(f"{what}: gathering layer inputs across ranks (gather_distributed_inputs=True under "
                           f"torch.distributed) is not implemented; run the pass on one process and load its result "
                           f"(eva_state_dict=) on every rank, or pass gather_distributed_inputs=False.")


# -- EVA --------------------------------------------------------------------------------------------
def get_eva_state_dict(m, dataloader, forward_fn=forward_fn_dict,
                       prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = False) -> dict:
    """PEFT's get_eva_state_dict: layer FQN -> lora_A (its rank rows; 0 rows: the layer drops out).
    `forward_fn(model, batch)` runs one batch (default model(**batch)); the model it gets runs our graph.
    `prepare_layer_inputs_fn` may be a dict keyed by layer FQN (PEFT's `base_model.model.` prefix is accepted)."""
    spec = _adapter(m, adapter_name, "eva")
    cfg = eva_config_of(spec.eva_config)
    _check_not_distributed(gather_distributed_inputs, "EVA")
    try:
        empty = len(dataloader) == 0
    except TypeError:
        raise AdapterError("EVA: the dataloader must have a length (PEFT's rule; it cycles over it until the "
                           "components converge); pass a DataLoader or a list of batches.") from None
    if empty:
        raise AdapterError("EVA: the dataloader is empty.")
    layers = _layers(m, adapter_name)
    peft_config = SimpleNamespace(r=spec.r, lora_alpha=spec.alpha, rank_pattern=spec.rank_pattern,
                                  alpha_pattern=spec.alpha_pattern, eva_config=SimpleNamespace(**cfg))
    rho = cfg["rho"]
    if rho > 1000:  # PEFT's ceiling for unusually high rho
        rho = min(rho, max(max(p.shape) for p in m.get_base_model().parameters()) // spec.r)
    layer_fns = _layer_fns(prepare_layer_inputs_fn, [layer.fqn for layer in layers])
    device = device_of(m)

    def model_input(inputs):
        return prepare_model_inputs_fn(inputs, peft_config) if prepare_model_inputs_fn is not None \
            else copy.deepcopy(inputs)

    with _DataPass(m, adapter_name) as run:
        runner = _EagerGraph(m, run)
        # one batch: which layers see equal inputs (their PCA is computed once)
        inputs = _to(next(iter(dataloader)), device)
        current = {"input": model_input(inputs)}
        hashes = defaultdict(list)
        max_components, budget = {}, 0
        for layer in layers:
            fqn = layer.fqn
            run.hook(fqn, lambda x, fqn=fqn: hashes[fqn].append(
                _hash(layer_fns[fqn]((x,), current["input"], fqn))))
            r = rank_of(spec, layer)
            max_components[fqn] = round(r * rho)
            budget += r
        _call(forward_fn, runner, inputs)
        for h in run.handles:
            h.remove()
        run.handles.clear()
        groups = defaultdict(list)
        for fqn in (layer.fqn for layer in layers):
            if hashes[fqn]:
                groups[hashes[fqn][0]].append(fqn)
        missing = [layer.fqn for layer in layers if not hashes[layer.fqn]]
        if missing:
            raise AdapterError(f"EVA: {missing[0]} was not called by the model on the first batch; EVA needs every "
                               f"target layer's inputs (exclude it from targets).")
        equal = [g for g in groups.values() if len(g) > 1]
        equal_to = {other: g[0] for g in equal for other in g[1:]}
        for g in equal:
            top = max(max_components[n] for n in g)
            for n in g:
                max_components[n] = top
        pcas = {layer.fqn: LayerPCA(max_components[layer.fqn], cfg["tau"]) for layer in layers
                if layer.fqn not in equal_to}
        layer_pca = {**{k: k for k in pcas}, **equal_to}
        hooked = dict.fromkeys(pcas, True)
        inputs_of = {}
        for fqn in pcas:
            run.hook(fqn, lambda x, fqn=fqn: pcas[fqn].update(layer_fns[fqn]((x,), inputs_of[fqn], fqn))
                     if hooked[fqn] else None)
        # cycle until every layer's needed components converged (PEFT: itertools.cycle over the dataloader)
        converged = dict.fromkeys(pcas, False)
        ranks = dict(max_components)
        for step, inputs in enumerate(itertools.cycle(dataloader)):
            inputs = _to(inputs, device)
            prepared = model_input(inputs)
            for fqn, pca in pcas.items():
                done = bool(torch.all(pca.converged[: ranks[fqn]]))
                if not converged[fqn] and done and hooked[fqn]:
                    hooked[fqn], converged[fqn] = False, True
                    continue
                if converged[fqn] and not done:
                    hooked[fqn], converged[fqn] = True, False
                inputs_of[fqn] = prepared
            if show_progress_bar:
                print(f"EVA step {step}: {sum(converged.values())}/{len(converged)} layers converged")
            if all(converged.values()):
                break
            _call(forward_fn, runner, inputs)
            if not all(p.fitted for p in pcas.values()):
                continue
            ranks = rank_distribution(pcas, layer_pca, equal_to, budget, max_components)
    return {fqn: pcas[layer_pca[fqn]].factor(rank, cfg["whiten"]) for fqn, rank in ranks.items()}


def _hash(x: torch.Tensor) -> int:
    """Equal values, equal hash (PEFT hashes the values as a tuple of floats)."""
    return hash((tuple(x.shape), x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()))


def _layer_fns(fn, fqns: list) -> dict:
    if fn is None:
        return dict.fromkeys(fqns, _prepare_layer_inputs_flat)
    if not isinstance(fn, Mapping):
        return dict.fromkeys(fqns, fn)
    given = {k.removeprefix("base_model.model."): v for k, v in fn.items()}
    unknown = sorted(set(given) - set(fqns))
    if unknown:
        raise AdapterError(f"EVA: prepare_layer_inputs_fn names layers the adapter does not have: {unknown}; its "
                           f"layers are {fqns}.")
    return {f: given.get(f, _prepare_layer_inputs_flat) for f in fqns}


def initialize_eva(m, dataloader=None, eva_state_dict: dict | None = None, forward_fn=forward_fn_dict,
                   prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                   prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                   adapter_name: str = "default", gather_distributed_inputs: bool = True,
                   show_progress_bar: bool = False):
    """PEFT's `initialize_lora_eva_weights` for an adapter made with `ac.LoRA(init="eva", eva_config=...)`:
    the data pass over `dataloader` (or a precomputed `eva_state_dict`: layer FQN -> lora_A), then the
    adapter re-created with EVA's ranks and lora_A. The adapter's tensors are new objects afterwards
    (their shapes change): build the optimizer after this call. Returns `m`."""
    spec = _adapter(m, adapter_name, "eva")
    if eva_state_dict is None:
        if dataloader is None:
            raise AdapterError("initialize_eva: pass a dataloader (or a precomputed eva_state_dict).")
        eva_state_dict = get_eva_state_dict(m, dataloader, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    cfg = eva_config_of(spec.eva_config)
    layers = _layers(m, adapter_name)
    eva = {k.removeprefix("base_model.model."): v for k, v in eva_state_dict.items()}
    unknown = sorted(set(eva) - {layer.fqn for layer in layers})
    if unknown:
        raise AdapterError(f"initialize_eva: eva_state_dict names layers adapter {adapter_name!r} does not adapt: "
                           f"{unknown[:3]}.")
    targets, rank_pattern, alpha_pattern, factors = [], {}, {}, {}
    for layer in layers:
        r = rank_of(spec, layer)
        alpha = pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha)
        new_rank = r
        if layer.fqn in eva:
            w = eva[layer.fqn]
            new_rank = w.size(0)
            if w.dim() != 2 or w.size(1) != layer.in_features:
                raise AdapterError(f"initialize_eva: {layer.fqn} needs lora_A rows of {layer.in_features} features, "
                                   f"got {tuple(w.shape)}.")
            if new_rank == 0:  # PEFT removes the adapter from this layer
                continue
            if new_rank != r and cfg["adjust_scaling_factors"]:
                alpha *= new_rank / r
            factors[layer.fqn] = w
        else:
            warnings.warn(f"EVA: {layer.fqn} is not in the eva_state_dict; it keeps the plain init (A kaiming, B 0), "
                          f"as in PEFT.", stacklevel=2)
        targets.append(layer.fqn)
        if new_rank != spec.r:
            rank_pattern[layer.fqn] = new_rank
        if alpha != spec.alpha:
            alpha_pattern[layer.fqn] = alpha
    if not targets:
        raise AdapterError(f"initialize_eva: EVA gave every layer of adapter {adapter_name!r} rank 0; raise r or rho.")
    new_spec = spec.replace(targets=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    active = m.state.active
    m.delete_adapter(adapter_name)
    try:
        m._add_adapter(adapter_name, new_spec)
    except Exception:
        m._add_adapter(adapter_name, spec)  # leave the adapter as it was
        if active:
            m.set_adapter(active)
        raise
    with torch.no_grad():
        for fqn, w in factors.items():
            a = m.slots[slot_key(fqn)].adapters[adapter_name].lora_A
            a.copy_(w.to(a.dtype))
    m.table.data_init.pop(adapter_name, None)
    if active:
        m.set_adapter(active)
    return m


# -- CorDA ------------------------------------------------------------------------------------------
def preprocess_corda(m, run_model=None, data=None, forward_fn=None, adapter_name: str = "default"):
    """PEFT's `preprocess_corda` + the CorDA init of `get_peft_model`, for an adapter made with
    `ac.LoRA(init="corda", corda_config=...)`: covariances of each target layer's inputs over the
    calibration data, the decomposition, then lora_A / lora_B and the residual base weight (our frozen
    copy; the user's model is untouched). The data: `data=` batches (each run as model(**batch), or
    `forward_fn(model, batch)`), or `run_model(model)`, a function that runs the model it is given on them
    (PEFT's run_model takes no argument because it closes over the hooked model; here the hooks are on our
    graph, so it must call the model it receives). One sample per call (batch size 1), as PEFT requires.
    corda_config's cache_file / covariance_file are read when present and written otherwise, as in PEFT.
    For an adapter loaded from a CorDA directory only the residual is rebuilt; its trained A, B stay.
    Returns `m`."""
    spec = _adapter(m, adapter_name, "corda")
    cfg = corda_config_of(spec.corda_config)
    layers = _layers(m, adapter_name)
    ranks = {layer.fqn: rank_of(spec, layer) for layer in layers}
    originals = m.table.base_originals.get(adapter_name, {})

    def weight(layer):  # the layer's own W (canonical layout), not a residual of an earlier run
        w = originals.get(layer.weight_fqn, m.table.frozen[layer.weight_fqn])
        return w.t() if layer.transposed else w

    cache = _existing(cfg["cache_file"])
    if cache is not None:
        stored = torch.load(cache, map_location=device_of(m))
        try:
            eig = {f: (stored[f"{f}.eigens.S_WC"], stored[f"{f}.eigens.U_WC"], stored[f"{f}.eigens.V_WC"])
                   for f in ranks}
        except KeyError as e:
            raise AdapterError(f"{cache}: CorDA cache_file has no {e.args[0]!r}; it was built for other target layers "
                               f"(delete it, or point cache_file elsewhere, to rebuild it from data).") from None
    else:
        covariances = _covariances(m, adapter_name, layers, cfg, run_model, data, forward_fn)
        eig = {layer.fqn: crop(eigens(weight(layer), covariances[layer.fqn]), ranks[layer.fqn], cfg["corda_method"])
               for layer in layers}
        if cfg["cache_file"] is not None:
            _save({f"{f}.eigens.{k}": t for f, (S, U, V) in eig.items() for k, t in
                   (("S_WC", S), ("U_WC", U), ("V_WC", V))}, cfg["cache_file"])
    residual_only = m.table.data_init.get(adapter_name) == "corda-residual"
    bases, made = {}, {}
    for layer in layers:
        got = corda_factors(weight(layer), eig[layer.fqn], scaling_of(spec, layer), layer.fqn)
        bases[layer.weight_fqn] = (got.base.t() if layer.transposed else got.base).contiguous()
        made[layer.fqn] = got
    with torch.no_grad():
        if not residual_only:
            for fqn, got in made.items():
                params = m.slots[slot_key(fqn)].adapters[adapter_name]
                params.lora_A.copy_(got.a.to(params.lora_A.dtype))
                params.lora_B.copy_(got.b.to(params.lora_B.dtype))
    m._set_residual_bases(adapter_name, bases)
    m.table.data_init.pop(adapter_name, None)
    return m


def _covariances(m, name, layers, cfg, run_model, data, forward_fn) -> dict:
    stored = _existing(cfg["covariance_file"])
    if stored is not None:
        covariances = torch.load(stored, map_location=device_of(m))
        missing = [layer.fqn for layer in layers if layer.fqn not in covariances]
        if missing:
            raise AdapterError(f"{stored}: CorDA covariance_file has no entry for {missing[0]}.")
        return {layer.fqn: covariances[layer.fqn] for layer in layers}
    if run_model is None and data is None:
        raise AdapterError("preprocess_corda: pass data=<batches> or run_model=<function of the model> (the "
                           "calibration pass), unless corda_config's cache_file or covariance_file exists.")
    if run_model is not None and len(inspect.signature(run_model).parameters) != 1:
        raise AdapterError("preprocess_corda: run_model must take one argument, the model to run (PEFT's closes over "
                           "the model it hooks; here the pass reads our graph, so call the model you are given).")
    sums, counts = {}, dict.fromkeys((layer.fqn for layer in layers), 0)

    def add(fqn, x):
        cov = sample_covariance(x, fqn, cfg["use_float16_for_covariance"])
        sums[fqn] = cov if fqn not in sums else sums[fqn] + cov
        counts[fqn] += 1

    device = device_of(m)
    with _DataPass(m, name) as run:
        for layer in layers:
            run.hook(layer.fqn, lambda x, fqn=layer.fqn: add(fqn, x))
        runner = _EagerGraph(m, run)
        if run_model is not None:
            run_model(runner)
        else:
            for batch in data:
                _call(forward_fn, runner, _to(batch, device))
    never = [f for f, c in counts.items() if c == 0]
    if never:
        raise AdapterError(f"CorDA: {never[0]} was never called during the calibration pass; exclude it from targets "
                           f"or run data that reaches it.")
    covariances = {f: sums[f] / counts[f] for f in counts}
    if cfg["covariance_file"] is not None:
        _save(covariances, cfg["covariance_file"])
    return covariances


def device_of(m):
    return next(iter(m.table.frozen.values())).device


def _existing(path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.exists() and p.stat().st_size > 0 else None


def _save(tensors: dict, path) -> None:
    """torch.save, written to a temporary file and renamed: never a half-written cache."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(tensors, tmp)
    tmp.replace(p)


# -- ac.compile(..., init_data=...) ------------------------------------------------------------------
def run_pending(m, init_data=None) -> None:
    """The data passes `ac.compile` runs: every adapter waiting for one, with `init_data` (EVA: its
    dataloader; CorDA: its calibration batches), or, for CorDA, corda_config's cache_file if it exists."""
    if init_data is not None and not m.table.data_init:
        raise AdapterError("compile(): init_data= is the data pass of a data-driven LoRA init (init='eva' or 'corda'), "
                           "and no adapter here has one; drop init_data or set the spec's init.")
    for name, pending in list(m.table.data_init.items()):
        spec = m.state.specs[name]
        if pending == "eva" and init_data is not None:
            initialize_eva(m, init_data, adapter_name=name)
        elif pending.startswith("corda") and (init_data is not None or _existing(
                corda_config_of(spec.corda_config)["cache_file"]) is not None):
            preprocess_corda(m, data=init_data, adapter_name=name)


__all__ = ["get_eva_state_dict", "initialize_eva", "preprocess_corda", "run_pending"]
