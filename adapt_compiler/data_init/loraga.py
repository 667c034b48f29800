"""LoRA-GA's data pass: PEFT's `preprocess_loraga` (gradients of the target weights over a training step) +
the LoRA-GA init of `get_peft_model`, over our graph. The math (the gradient's SVD, direction, scale, the
residual) is in passes/_lora_init_loraga.py.

PEFT switches the model to train mode, makes only the target weights require grad, runs the user's
`train_step()` (forwards and `loss.backward()`), and keeps weight.grad / (the number of backward passes
through the module). Here the same runs on our captured graph: train mode, no adapter active (each slot
computes its base layer, as the model does before get_peft_model), our frozen copies of the target weights
require grad for the pass (the user's parameters never do, and never get a .grad), and each layer's backward
passes are counted by a hook on its output's gradient, as PEFT's full backward hook counts them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from ..errors import AdapterError
from ..passes._lora_init import replayed
from ..passes._lora_init_loraga import lora_ga_config_of, loraga_factors, peft_linear_draws
from ..passes.lora import _as_dict, rank_of, scaling_of
from ._pass import (DataPass, EagerGraph, adapter_spec, call, device_of, existing, install_residual_init, layers_of,
                    save_atomic, to_device)


def preprocess_loraga(m, lora_config=None, train_step=None, cache_file=None, *, data=None, forward_fn=None,
                      adapter_name: str = "default"):
    """PEFT's `preprocess_loraga(model, lora_config, train_step, cache_file)` + the LoRA-GA init of
    `get_peft_model`, for an adapter made with `ac.LoRA(init="lora_ga", lora_ga_config=...)`: the averaged
    gradient of each target weight over the training step, its SVD, then lora_A / lora_B and the residual base
    weight (in our frozen copy; the user's model is untouched).

    The training step: `data=` batches (each run as model(**batch), or `forward_fn(model, batch)`, and its loss
    backpropagated: the output's `.loss`, or the scalar forward_fn returns), or `train_step(model)`, a function
    that runs the model it is given and calls `.backward()` on its losses (PEFT's train_step takes no argument
    because it closes over the model; here the gradients are taken in our graph, so it must call the model it
    receives). `lora_config`: optional, PEFT's LoraConfig, checked against the adapter's. `cache_file`: the
    gradients are read from it when it exists and written to it otherwise, in PEFT's format.
    The SVD is randomized: it draws from the generators as they were when the adapter was created, as PEFT's
    get_peft_model draws (seed before ac.compile as before get_peft_model for PEFT's factors).
    For an adapter loaded from a LoRA-GA directory only the residual is rebuilt; its trained A, B stay.
    Returns `m`."""
    spec = adapter_spec(m, adapter_name, "lora_ga")
    if lora_config is not None:
        _check_same_config(spec, lora_config)
    pending = m.table.data_init.get(adapter_name)
    if pending is None:
        raise AdapterError(f"preprocess_loraga: adapter {adapter_name!r} is already initialised (its residual base is in "
                           f"place, and a new gradient pass would run over it); delete_adapter({adapter_name!r}) and add "
                           f"it again to start over.")
    layers = layers_of(m, adapter_name)
    cache = existing(cache_file)
    if cache is not None:
        stored = torch.load(cache, map_location=device_of(m))
        try:
            grads = {layer.fqn: stored[f"{layer.fqn}._peft_loraga_grad"] for layer in layers}
        except KeyError as e:
            raise AdapterError(f"{cache}: LoRA-GA cache_file has no {e.args[0]!r}; it was built for other target layers "
                               f"(delete it, or point cache_file elsewhere, to rebuild it from data).") from None
    else:
        grads = _gradients(m, adapter_name, layers, train_step, data, forward_fn)
        if cache_file is not None:
            save_atomic({f"{f}._peft_loraga_grad": g for f, g in grads.items()}, cache_file)
    frozen = m.table.frozen
    made, bases = {}, {}
    with replayed(m.table.data_init_rng[adapter_name]):  # PEFT's draws, layer by layer in module order
        for layer in layers:
            r = rank_of(spec, layer)
            peft_linear_draws(layer.in_features, layer.out_features, r)
            got = loraga_factors(frozen[layer.weight_fqn], grads[layer.fqn], layer.transposed, r,
                                 scaling_of(spec, layer), spec.lora_ga_config, layer.fqn)
            bases[layer.weight_fqn] = (got.base.t() if layer.transposed else got.base).contiguous()
            made[layer.fqn] = got
    install_residual_init(m, adapter_name, made, bases, factors=pending != "lora_ga-residual")
    m.table.data_init_rng.pop(adapter_name, None)
    return m


def _check_same_config(spec, lora_config) -> None:
    """PEFT's lora_config argument, if given, must describe this adapter (we never read a second config)."""
    theirs = {"init_lora_weights": getattr(lora_config, "init_lora_weights", None),
              "r": getattr(lora_config, "r", None), "lora_alpha": getattr(lora_config, "lora_alpha", None),
              "use_rslora": getattr(lora_config, "use_rslora", False),
              "rank_pattern": dict(getattr(lora_config, "rank_pattern", None) or {}),
              "alpha_pattern": dict(getattr(lora_config, "alpha_pattern", None) or {})}
    ours = {"init_lora_weights": spec.init, "r": spec.r, "lora_alpha": spec.alpha, "use_rslora": spec.rslora,
            "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern)}
    if theirs["init_lora_weights"] == "lora_ga":
        theirs["lora_ga_config"] = lora_ga_config_of(_as_dict(getattr(lora_config, "lora_ga_config", None),
                                                              "lora_ga_config"))
        ours["lora_ga_config"] = spec.lora_ga_config
    differ = [k for k in theirs if theirs[k] != ours.get(k)]
    if differ:
        k = differ[0]
        raise AdapterError(f"preprocess_loraga: lora_config's {k}={theirs[k]!r} differs from the adapter's "
                           f"({ours.get(k)!r}); the adapter's own config is what the pass uses, so pass the config "
                           f"the adapter was made with, or none.")


def _loss_of(out):
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    raise AdapterError("preprocess_loraga: a batch's output has no scalar loss to backpropagate (PEFT's train_step "
                       "calls loss.backward()); pass batches with labels, a forward_fn(model, batch) that returns the "
                       "loss, or train_step=fn(model).")


def _gradients(m, name, layers, train_step, data, forward_fn) -> dict:
    """Layer FQN -> its weight's gradient (stored layout, the weight's dtype) over the training step, divided
    by the number of backward passes through the layer, as PEFT's estimate_gradients."""
    if train_step is None and data is None:
        raise AdapterError("preprocess_loraga: pass data=<batches> or train_step=<function of the model> (the "
                           "gradient pass), unless cache_file exists.")
    if train_step is not None and len(inspect.signature(train_step).parameters) != 1:
        raise AdapterError("preprocess_loraga: train_step must take one argument, the model to run (PEFT's closes over "
                           "the model; here the gradients are taken in our graph, so call the model you are given and "
                           "call .backward() on the loss).")
    frozen = m.table.frozen
    weights = {layer.weight_fqn: frozen[layer.weight_fqn] for layer in layers}
    counts = dict.fromkeys((layer.fqn for layer in layers), 0)

    def count_backward(fqn, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: counts.__setitem__(fqn, counts[fqn] + 1))

    device = device_of(m)
    with DataPass(m, name, train=True) as run:
        for layer in layers:
            run.hook_output(layer.fqn, lambda out, fqn=layer.fqn: count_backward(fqn, out))
        try:
            for w in weights.values():
                w.grad = None
                w.requires_grad_(True)
            runner = EagerGraph(m)
            if train_step is not None:
                train_step(runner)
            else:
                for batch in data:
                    _loss_of(call(forward_fn, runner, to_device(batch, device))).backward()
            grads = {}
            for layer in layers:
                g = weights[layer.weight_fqn].grad
                if g is None or counts[layer.fqn] == 0:
                    raise AdapterError(f"LoRA-GA: {layer.fqn} got no gradient from the training step (PEFT would "
                                       f"silently give it the plain random init); run data whose loss reaches it, or "
                                       f"exclude it from targets.")
                grads[layer.fqn] = g.detach() / counts[layer.fqn]
        finally:
            for w in weights.values():
                w.requires_grad_(False)
                w.grad = None
    return grads
