"""LoRA on bare parameters: PEFT's `target_parameters` and `trainable_token_indices`. A helper file
(the registry skips `_`-prefixed files), used by passes/lora.py.

A targeted parameter W is a layer of kind "parameter": its slot sits after every read of W in the
graph and returns W' (the ops that use W then see W', whatever they are: a grouped MoE matmul, an
embedding lookup, a tied output head).

target_parameters (PEFT's ParamWrapper), W (d_out, d_in) or MoE experts (E, ·, ·):
    A (r·E, d_in), B (d_out, r·E)          W' = W + s·B A                        (E = 1)
    W' = W + s·einsum("o r e, e r i -> e o i", B, A)   experts stored (E, d_out, d_in)
    W' = W + s·einsum("o r e, e r i -> e i o", B, A)   experts stored (E, d_in, d_out) (`is_transposed`)
PEFT's keys sit on the parameter's module; several targeted parameters of one module nest, the
earlier-wrapped ones under `base_layer.` (first in named_parameters order = innermost).

trainable_token_indices (PEFT's TrainableTokensLayer): W' = W with rows `idx` replaced by
`trainable_tokens_delta` (initialised to those rows of W), key `<embedding>.token_adapter.*`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AdapterError, AdapterShapeError
from ..spec import _matches_list
from .method import Layer


def parameter_layers(spec, model: nn.Module) -> dict[str, Layer]:
    """The "parameter" layers of a LoRA spec: its target_parameters and its trainable tokens."""
    out: dict[str, Layer] = {}
    targets = list(spec.target_parameters or [])
    for module_fqn, module in model.named_modules():
        hits = [(name, p) for name, p in module.named_parameters(recurse=False)
                if targets and _matches_list(targets, f"{module_fqn}.{name}" if module_fqn else name)]
        for i, (name, param) in enumerate(hits):
            fqn = f"{module_fqn}.{name}" if module_fqn else name
            if param.dim() not in (2, 3):
                raise AdapterShapeError(
                    f"{fqn}: target_parameters adapts 2-D weights and 3-D expert stacks, this one is {param.dim()}-D.")
            nested = ".base_layer" * (len(hits) - 1 - i)  # PEFT nests wrappers: the first one is innermost
            layout = "in_out" if param.dim() == 3 and getattr(module, "is_transposed", False) else "out_in"
            out[fqn] = Layer(fqn=fqn, kind="parameter", weight_shape=tuple(param.shape), has_bias=False,
                             dtype=param.dtype, peft_path=f"{module_fqn}{nested}", layout=layout)
    if targets and not out:
        raise AdapterError(f"LoRA: target_parameters={targets!r} matched no parameter of the model "
                           f"(names are '<module path>.<parameter>' or a dotted suffix of one).")
    out.update(_token_layers(spec, model))
    return out


def _token_layers(spec, model: nn.Module) -> dict[str, Layer]:
    wanted = spec.trainable_token_indices
    if not wanted:
        return {}
    modules = dict(model.named_modules())
    if isinstance(wanted, dict):
        pairs = []
        for key, indices in wanted.items():
            hits = [f for f in modules if f and _matches_list([key], f)]
            if not hits:
                raise AdapterError(f"LoRA: trainable_token_indices names {key!r}, which is no module of the model.")
            pairs += [(f, indices) for f in hits]
    else:  # a list: the input embedding (PEFT: get_input_embeddings(), else `embed_tokens`)
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        names = [f for f, m in modules.items() if m is emb] or [f for f in modules if _matches_list(["embed_tokens"], f)]
        if not names:
            raise AdapterError("LoRA: trainable_token_indices is a list but the model has no input embedding "
                               "(get_input_embeddings) nor an `embed_tokens`; pass {'<embedding module>': [...]}.")
        pairs = [(names[0], wanted)]
    out = {}
    for fqn, indices in pairs:
        module = modules[fqn]
        if not isinstance(module, nn.Embedding):
            raise AdapterShapeError(f"{fqn}: trainable_token_indices needs an nn.Embedding, this is "
                                    f"{type(module).__name__}.")
        indices = tuple(int(i) for i in indices)
        if not indices or len(set(indices)) != len(indices) or not all(0 <= i < module.num_embeddings for i in indices):
            raise AdapterError(f"{fqn}: trainable_token_indices must be distinct rows in [0, {module.num_embeddings}), "
                               f"got {list(indices)[:8]}.")
        w = module.weight
        out[f"{fqn}.weight"] = Layer(fqn=f"{fqn}.weight", kind="parameter", weight_shape=tuple(w.shape),
                                     has_bias=False, dtype=w.dtype, peft_path=f"{fqn}.token_adapter",
                                     token_indices=indices)
    return out


def check(spec, layer: Layer) -> None:
    """What PEFT refuses on a wrapped parameter (ParamWrapper raises for each), refused here by name."""
    if layer.token_indices:
        return
    for field, value in (("dropout (lora_dropout)", spec.dropout), ("use_dora", spec.use_dora),
                         ("lora_bias", spec.lora_bias)):
        if value:
            raise AdapterShapeError(
                f"{layer.fqn}: target_parameters does not work with {field}={value!r} (PEFT's ParamWrapper raises: "
                f"the update is applied to the weight, there is no input to drop or bias to add).")


def experts(layer: Layer) -> tuple[int, int, int]:
    """(E, d_in, d_out) of a targeted parameter."""
    shape = layer.weight_shape
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    e, a, b = shape
    return (e, b, a) if layer.layout == "out_in" else (e, a, b)


def init_params(spec, layer: Layer, weight: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    if layer.token_indices:
        rows = weight.detach()[list(layer.token_indices)].clone()
        return {"trainable_tokens_delta": rows}
    e, d_in, d_out = experts(layer)
    a = torch.empty(r * e, d_in, dtype=weight.dtype)
    b = torch.empty(d_out, r * e, dtype=weight.dtype)
    init_factors_(spec, a, b, r)
    return {"lora_A": a, "lora_B": b}


def adapted(layer: Layer, p, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """W' for a targeted parameter (or an embedding with trainable tokens)."""
    if layer.token_indices:
        index = torch.tensor(layer.token_indices, device=weight.device)
        return weight.index_copy(0, index, p["trainable_tokens_delta"].to(weight.dtype))
    a, b = p["lora_A"], p["lora_B"]
    e, d_in, d_out = experts(layer)
    if len(layer.weight_shape) == 2:
        delta = b @ a
    else:
        a3 = a.reshape(e, -1, d_in)  # (E, r, d_in)
        b3 = b.reshape(d_out, -1, e)  # (d_out, r, E)
        eq = "ore,eri->eoi" if layer.layout == "out_in" else "ore,eri->eio"
        delta = torch.einsum(eq, b3, a3)
    return weight + (delta * scaling).to(weight.dtype)


def peft_key(param_name: str, layer: Layer) -> str:
    if layer.token_indices:
        return param_name  # trainable_tokens_delta, under `<embedding>.token_adapter`
    return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}[param_name]


def init_factors_(spec, a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """PEFT's plain LoRA init, in place: A kaiming-uniform (normal(0, 1/r) with init="gaussian"),
    B zero (kaiming-uniform too with init=False, so the adapter starts non-zero)."""
    if spec.init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if spec.init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)

