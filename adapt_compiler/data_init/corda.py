"""CorDA's data pass: PEFT's `preprocess_corda` + the CorDA init of `get_peft_model`, over our graph.
The math (covariances, the damped decomposition, the ipm/kpm crop, the residual) is in
passes/_lora_init_corda.py."""

from __future__ import annotations

import inspect

import torch

from ..errors import AdapterError
from ..passes._lora_init_corda import corda_config_of, corda_factors, crop, eigens, sample_covariance
from ..passes.lora import rank_of, scaling_of
from ._pass import (DataPass, EagerGraph, adapter_spec, call, device_of, existing, install_residual_init, layers_of,
                    save_atomic, to_device)


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
    spec = adapter_spec(m, adapter_name, "corda")
    cfg = corda_config_of(spec.corda_config)
    layers = layers_of(m, adapter_name)
    ranks = {layer.fqn: rank_of(spec, layer) for layer in layers}
    originals = m.table.base_originals.get(adapter_name, {})

    def weight(layer):  # the layer's own W (canonical layout), not a residual of an earlier run
        w = originals.get(layer.weight_fqn, m.table.frozen[layer.weight_fqn])
        return w.t() if layer.transposed else w

    cache = existing(cfg["cache_file"])
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
            save_atomic({f"{f}.eigens.{k}": t for f, (S, U, V) in eig.items() for k, t in
                   (("S_WC", S), ("U_WC", U), ("V_WC", V))}, cfg["cache_file"])
    residual_only = m.table.data_init.get(adapter_name) == "corda-residual"
    bases, made = {}, {}
    for layer in layers:
        got = corda_factors(weight(layer), eig[layer.fqn], scaling_of(spec, layer), layer.fqn)
        bases[layer.weight_fqn] = (got.base.t() if layer.transposed else got.base).contiguous()
        made[layer.fqn] = got
    install_residual_init(m, adapter_name, made, bases, factors=not residual_only)
    return m


def _covariances(m, name, layers, cfg, run_model, data, forward_fn) -> dict:
    stored = existing(cfg["covariance_file"])
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
    with DataPass(m, name) as run:
        for layer in layers:
            run.hook(layer.fqn, lambda x, fqn=layer.fqn: add(fqn, x))
        runner = EagerGraph(m, run)
        if run_model is not None:
            run_model(runner)
        else:
            for batch in data:
                call(forward_fn, runner, to_device(batch, device))
    never = [f for f, c in counts.items() if c == 0]
    if never:
        raise AdapterError(f"CorDA: {never[0]} was never called during the calibration pass; exclude it from targets "
                           f"or run data that reaches it.")
    covariances = {f: sums[f] / counts[f] for f in counts}
    if cfg["covariance_file"] is not None:
        save_atomic(covariances, cfg["covariance_file"])
    return covariances


