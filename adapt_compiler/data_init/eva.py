"""EVA's data pass: PEFT's `get_eva_state_dict` / `initialize_lora_eva_weights` over our graph.
The math (incremental PCA, convergence, rank redistribution) is in passes/_lora_init_eva.py."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import defaultdict
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from ..errors import AdapterError
from ..names import slot_key
from ..passes._lora_init_eva import LayerPCA, eva_config_of, rank_distribution
from ..passes._patterns import pattern_value
from ..passes.lora import rank_of
from ._pass import DataPass, EagerGraph, adapter_spec, call, check_not_distributed, device_of, layers_of, to_device


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



def get_eva_state_dict(m, dataloader, forward_fn=forward_fn_dict,
                       prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = False) -> dict:
    """PEFT's get_eva_state_dict: layer FQN -> lora_A (its rank rows; 0 rows: the layer drops out).
    `forward_fn(model, batch)` runs one batch (default model(**batch)); the model it gets runs our graph.
    `prepare_layer_inputs_fn` may be a dict keyed by layer FQN (PEFT's `base_model.model.` prefix is accepted)."""
    spec = adapter_spec(m, adapter_name, "eva")
    cfg = eva_config_of(spec.eva_config)
    check_not_distributed(gather_distributed_inputs, "EVA")
    try:
        empty = len(dataloader) == 0
    except TypeError:
        raise AdapterError("EVA: the dataloader must have a length (PEFT's rule; it cycles over it until the "
                           "components converge); pass a DataLoader or a list of batches.") from None
    if empty:
        raise AdapterError("EVA: the dataloader is empty.")
    layers = layers_of(m, adapter_name)
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

    with DataPass(m, adapter_name) as run:
        runner = EagerGraph(m, run)
        # one batch: which layers see equal inputs (their PCA is computed once)
        inputs = to_device(next(iter(dataloader)), device)
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
        call(forward_fn, runner, inputs)
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
            inputs = to_device(inputs, device)
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
            call(forward_fn, runner, inputs)
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
    spec = adapter_spec(m, adapter_name, "eva")
    if eva_state_dict is None:
        if dataloader is None:
            raise AdapterError("initialize_eva: pass a dataloader (or a precomputed eva_state_dict).")
        eva_state_dict = get_eva_state_dict(m, dataloader, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    cfg = eva_config_of(spec.eva_config)
    layers = layers_of(m, adapter_name)
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


