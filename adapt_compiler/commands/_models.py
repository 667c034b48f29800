"""`--model` for the CLI commands: a builtin tiny model, a transformers config or model directory, or a
Python factory."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError

MODEL_HELP = (
    "a builtin tiny model (llama, mistral, gpt2, bert, vit, convnet), a HF config (config.json or a "
    "directory with one; random weights unless the directory holds weights), or python:MODULE:FACTORY "
    "(MODULE may be a .py path)"
)


# -- builtin tiny models ------------------------------------------------------------------------------------
def _builtin_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, use_cache=False))


def _builtin_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, use_cache=False))


def _builtin_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                      use_cache=False, bos_token_id=0, eos_token_id=0))


def _builtin_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        num_labels=3))


def _builtin_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=4))


class _ConvNet(nn.Module):
    def __init__(self, ch: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        h = h + self.conv2(torch.nn.functional.silu(self.conv1(h)))
        return self.conv_out(torch.nn.functional.silu(self.proj(h)))


BUILTIN_MODELS = {
    "llama": _builtin_llama,
    "mistral": _builtin_mistral,
    "gpt2": _builtin_gpt2,
    "bert": _builtin_bert,
    "vit": _builtin_vit,
    "convnet": _ConvNet,
}


def _declared_class(config):
    """The first class named in the config's `architectures` that this transformers has, else None."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)


def _from_config(path: Path) -> nn.Module:
    import transformers

    cfg_file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"--model {path}: cannot read a JSON config ({err}).") from err
    if "peft_type" in raw:
        raise AdapterError(f"--model {path}: this is an adapter config; pass it as --adapter {cfg_file.parent}.")
    if "model_type" not in raw:
        raise AdapterError(f"--model {path}: no 'model_type' field; is this a transformers config.json?")
    config = transformers.AutoConfig.for_model(**raw)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    declared = _declared_class(config)
    if declared is not None:
        return declared(config)
    for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel"):
        try:
            return getattr(transformers, auto).from_config(config)
        except ValueError:
            continue
    raise AdapterError(f"--model {path}: transformers has no model class for model_type {raw['model_type']!r}.")


def import_object(ref: str, flag: str = "--model"):
    """What `python:MODULE:NAME` names, called if it is a function that is not a module (MODULE may be a .py path)."""
    module_name, _, attr = ref.removeprefix("python:").rpartition(":")
    if not module_name or not attr:
        raise AdapterError(f"{flag} {ref}: expected python:MODULE:FACTORY, e.g. python:my_pkg.models:build.")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or not Path(module_name).is_file():
            raise AdapterError(f"{flag} {ref}: no file {module_name}.")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to where you run it
        try:
            mod = importlib.import_module(module_name)
        except ImportError as err:
            raise AdapterError(f"{flag} {ref}: cannot import {module_name!r} ({err}); check the name and "
                               f"PYTHONPATH.") from err
    obj = getattr(mod, attr, None)
    if obj is None:
        raise AdapterError(f"{flag} {ref}: {module_name} has no attribute {attr!r}.")
    return obj() if callable(obj) and not isinstance(obj, nn.Module) else obj


def _has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("pytorch_model*.bin"))


def _from_pretrained(path: Path) -> nn.Module:
    """A local transformers model directory with weights: the real model, not random weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    return (_declared_class(config) or transformers.AutoModelForCausalLM).from_pretrained(str(path))


def load_model(text: str) -> nn.Module:
    """A model from a builtin name, a HF config (file, or dir: random weights unless it holds weights), or
    python:MODULE:FACTORY."""
    if text in BUILTIN_MODELS:
        torch.manual_seed(0)
        return BUILTIN_MODELS[text]()
    path = Path(text)
    model_dir = path.is_dir() and (path / "config.json").is_file()
    if text.startswith("python:") or (":" in text and not path.exists()):
        model = import_object(text)
    elif model_dir and _has_weights(path):
        model = _from_pretrained(path)
    elif path.suffix == ".json" or model_dir:
        if not path.exists():
            raise AdapterError(f"--model {text}: no such file.")
        model = _from_config(path)
    else:
        raise AdapterError(f"--model {text!r}: not understood; use {MODEL_HELP}.")
    if not isinstance(model, nn.Module):
        raise AdapterError(f"--model {text}: gave a {type(model).__name__}, not an nn.Module.")
    return model
