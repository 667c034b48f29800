"""Default targets per model type, as data: what PEFT 0.21.2 adapts when `target_modules` is None.

Facts read off PEFT's per-method tables (peft/utils/constants.py), not its code: LoRA, LoHa, LoKr,
OFT, BOFT, HRA and MiSS share one table; AdaLoRA has its own. A model type that no table lists gets
its attention projections found in the captured graph instead (passes/_attention.py), which is what
these tables spell out by hand for the listed ones: the query and value projections, or the fused
qkv projection.

Also here: PEFT's `all-linear` on Mixture-of-Experts models whose experts transformers 5 fused into
3-D parameters: PEFT adapts those through target_parameters (the fused gate/up stack with rank and
alpha doubled, as the two projections it replaces), keyed by transformers' conversion pattern.
"""

from __future__ import annotations

_QV = ["q_proj", "v_proj"]

# model_type -> target_modules (a list of name suffixes, or a regex), PEFT's LoRA-family table
LORA_FAMILY = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": _QV,
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": _QV,
    "gptj": _QV,
    "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV,
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": _QV,
    "llama4": _QV,
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

ADALORA = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": _QV,
    "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV,
    "llama": _QV,
    "llama4": _QV,
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# method name -> its table (methods not listed have no model-type defaults)
BY_METHOD = {m: LORA_FAMILY for m in ("lora", "loha", "lokr", "oft", "boft", "hra", "bone")}
BY_METHOD["adalora"] = ADALORA

# transformers' conversion pattern (conversion_mapping._MODEL_TO_CONVERSION_PATTERN, plus "mixtral")
# -> {expert parameter: how many v4 projections it fuses}, and the router's weight
MOE_ALL_LINEAR = {
    "mixtral": {"gate_up_proj": 2, "down_proj": 1, "gate.weight": 1},
    "qwen2_moe": {"gate_up_proj": 2, "down_proj": 1, "gate.weight": 1},
}


def peft_default(method: str, model_type: str | None):
    """PEFT's default targets for this method and model type, or None if PEFT has none."""
    return BY_METHOD.get(method, {}).get(model_type)


def moe_conversion(model_type: str | None) -> dict | None:
    """The fused expert parameters PEFT's `all-linear` adapts on this model type (transformers 5), or None."""
    if model_type is None:
        return None
    pattern = "mixtral" if model_type == "mixtral" else None
    try:  # transformers' own table of which MoE models fused their experts
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

        pattern = pattern or _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    except ImportError:
        pass
    return MOE_ALL_LINEAR.get(pattern)
