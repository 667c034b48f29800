"""Quantized tiny Llamas: loaded as users load them (transformers `quantization_config`) or quantized
by hand with bitsandbytes / torchao. Nothing is downloaded: the float model is built from a config,
saved to a temporary directory, and loaded back quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import tiny_llama

QUANT_EXTRA = "the `quant` extra is not installed (pip install 'adapt-compiler[quant]': bitsandbytes, torchao)"


def require(package: str):
    """Skip (visibly) only when the optional extra is absent."""
    return pytest.importorskip(package, reason=QUANT_EXTRA)


def save_float_llama(path, seed: int = 0) -> str:
    tiny_llama(seed=seed).save_pretrained(path)
    return str(path)


def load_quantized(path, scheme: str) -> nn.Module:
    """scheme: "nf4" (double quant, fp32 compute), "fp4" (no double quant), "int8" (bitsandbytes),
    "torchao_int8" (TorchAoConfig(Int8WeightOnlyConfig())). Frozen, train mode off."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    if scheme in ("nf4", "fp4"):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme,
                                    bnb_4bit_use_double_quant=scheme == "nf4", bnb_4bit_compute_dtype=torch.float32)
    elif scheme == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif scheme == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    else:
        raise ValueError(scheme)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()


def quantize_by_hand(model: nn.Module, scheme: str, compute_dtype=torch.float32, skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (but `skip`) of `model` in place: "nf4"/"fp4" (bitsandbytes Linear4bit,
    double quant for nf4), "int8" (Linear8bitLt), "torchao_int8" (torchao quantize_). Sets the
    `is_loaded_in_*bit` flags transformers sets (PEFT dispatches its bitsandbytes layers on them)."""
    if scheme == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.split(".")[-1] not in skip)
        return model.requires_grad_(False)
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            if scheme in ("nf4", "fp4"):
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, compress_statistics=scheme == "nf4",
                                        quant_type=scheme, device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=scheme,
                                               compress_statistics=scheme == "nf4", blocksize=64,
                                               module=new).to("cpu")
                new.quant_state = new.weight.quant_state
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=0.0, device="meta")
                new.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False,
                                               has_fp16_weights=False).to("cpu")
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, new)
    model.is_loaded_in_4bit = scheme in ("nf4", "fp4")
    model.is_loaded_in_8bit = scheme == "int8"
    return model.requires_grad_(False)


def model_state(model: nn.Module) -> dict:
    """Everything about a (quantized) model that must not change: tensors' values and identities,
    quantization states, instance attributes such as a patched `forward`."""
    out = {}
    for fqn, mod in model.named_modules():
        out[f"{fqn}:forward-patched"] = "forward" in mod.__dict__
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            inner = [t.qdata, t.scale] if hasattr(t, "qdata") else [t]
            out[f"{fqn}.{name}"] = (id(t), [x.detach().clone() for x in inner])
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code, state.offset, *(
                [state.state2.absmax, state.state2.code] if state.nested else [])]
            out[f"{fqn}:quant_state"] = (id(state), id(state.absmax), bool(state.nested),
                                         getattr(state, "packing_format_for_cpu", False),
                                         [x.clone() if isinstance(x, torch.Tensor) else x for x in tensors])
    return out


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, a in before.items():
        b = after[key]
        if key.endswith(":forward-patched"):
            assert a == b, f"{key}: forward patched"
        elif key.endswith(":quant_state"):
            assert a[:4] == b[:4], f"{key}: quant state replaced or repacked"
            for x, y in zip(a[4], b[4]):
                assert (x is None and y is None) or torch.equal(x, y), f"{key}: quant state values changed"
        else:
            assert a[0] == b[0], f"{key}: tensor object replaced"
            for x, y in zip(a[1], b[1]):
                assert torch.equal(x, y), f"{key}: values changed"
