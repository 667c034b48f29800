"""LoftQ initialisation of LoRA over a bitsandbytes 4-bit base, against PEFT's algorithm.

PEFT 0.21.2's LoftQ does not run on CPU (`loftq_utils` hard-codes `"xpu" if is_xpu_available() else
"cuda"`, and its LoftQ config needs scipy). The oracle here is PEFT's own code: the source of
`loftq_init` and `_loftq_init_new`, taken from the installed PEFT with only that device line
changed to "cpu", run on the same weights.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from quant_models import load_quantized, require, save_float_llama

bnb = require("bitsandbytes")

import adapt_compiler as ac  # noqa: E402
from adapt_compiler.errors import AdapterError  # noqa: E402
from models import tiny_llama, token_batch  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
R = 4


def _peft_on_cpu(name: str):
    """PEFT's function `name` from peft/utils/loftq_utils.py, with its compute device set to the CPU."""
    import peft.utils.loftq_utils as loftq_utils

    src = inspect.getsource(getattr(loftq_utils, name))
    device_line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert device_line in src, "PEFT's LoftQ changed; update this oracle"
    scope = dict(vars(loftq_utils))
    exec(compile(src.replace(device_line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), scope)  # noqa: S102
    return scope[name]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_float_llama(tmp_path_factory.mktemp("loftq_llama"))


def _loftq(model, path, **kw):
    config = {"loftq_bits": 4, "loftq_iter": 1, "model_path": str(path), **kw}
    return ac.compile(model, ac.LoRA(r=R, alpha=R, targets=ATTN, init="loftq", loftq_config=config), lowering="eager")


def _float_weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_equals_peft_loftq_init_over_its_own_quantization(float_dir):
    """nf4 without double quant is exactly the Q of PEFT's `loftq_init(W, 4, r, num_iter=1)`: the
    adapter starts with PEFT's lora_A, lora_B, bit for bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32).eval()
    model.config.use_cache = False
    m = _loftq(model, float_dir)
    peft_loftq_init = _peft_on_cpu("loftq_init")
    weights = _float_weights(float_dir)
    state = m.adapter_state_dict()
    for fqn in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        q, lora_a, lora_b = peft_loftq_init(weights[fqn + ".weight"], num_bits=4, reduced_rank=R, num_iter=1)
        assert torch.equal(state[f"base_model.model.{fqn}.lora_A.weight"], lora_a)
        assert torch.equal(state[f"base_model.model.{fqn}.lora_B.weight"], lora_b)
        layer = dict(model.named_modules())[fqn]
        assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), q)


def test_equals_peft_replace_lora_weights_loftq_over_double_quant(float_dir):
    """Over a double-quantized nf4 base: PEFT's `_loftq_init_new` (its replace_lora_weights_loftq)."""
    model = load_quantized(float_dir, "nf4")
    m = _loftq(model, float_dir)
    peft_init_new = _peft_on_cpu("_loftq_init_new")
    weights = _float_weights(float_dir)
    state = m.adapter_state_dict()
    modules = dict(model.named_modules())
    for fqn in [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ATTN]:
        lora_a, lora_b = peft_init_new(modules[fqn].weight, weights[fqn + ".weight"], num_bits=4, reduced_rank=R)
        assert torch.equal(state[f"base_model.model.{fqn}.lora_A.weight"], lora_a), fqn
        assert torch.equal(state[f"base_model.model.{fqn}.lora_B.weight"], lora_b), fqn
    # what LoftQ is for: the adapted 4-bit model starts closer to the float model than the 4-bit base
    batch = token_batch()
    float_model = tiny_llama()
    with torch.no_grad():
        want = float_model(**batch).logits
        m.train()  # bitsandbytes' own eval path repacks; ours keeps the training numerics in both modes
        adapted = m(**batch).logits
        with m.disable_adapters():
            plain = m(**batch).logits
    assert (adapted - want).norm() < 0.9 * (plain - want).norm()


@pytest.mark.parametrize("config,match", [
    ({"loftq_iter": 2}, "one iteration"),
    ({"loftq_bits": 8}, "4 bits"),
    ({"model_path": ""}, "model_path"),
    ({"nonsense": 1}, "unknown keys"),
])
def test_bad_loftq_config(config, match, tmp_path):
    full = {"loftq_bits": 4, "loftq_iter": 1, "model_path": str(tmp_path), **config}
    with pytest.raises(AdapterError, match=match):
        ac.LoRA(r=R, init="loftq", loftq_config=full)
    with pytest.raises(AdapterError, match="only read with init='loftq'"):
        ac.LoRA(r=R, loftq_config={"loftq_bits": 4})


def test_loftq_needs_a_4bit_base_and_its_checkpoint(float_dir, tmp_path):
    with pytest.raises(AdapterError, match="LoftQ initialises LoRA over a bitsandbytes 4-bit base"):
        _loftq(tiny_llama(), float_dir)
    model = load_quantized(float_dir, "nf4")
    with pytest.raises(AdapterError, match="neither a .safetensors file"):
        _loftq(model, tmp_path)
    other = save_float_llama(tmp_path / "other", seed=0)
    tiny = tiny_llama(layers=1)
    tiny.save_pretrained(tmp_path / "one_layer")
    with pytest.raises(AdapterError, match="no tensor 'model.layers.1.self_attn.q_proj.weight'"):
        _loftq(model, tmp_path / "one_layer")
    assert other  # a checkpoint with every layer loads fine
    _loftq(model, other)
