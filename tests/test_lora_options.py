"""PEFT's LoRA options and initialisations (issue 20), each against PEFT 0.21.2 on a tiny Llama with the
whole contract (tests/oracle.py `check_full_parity`): outputs and adapter gradients, a training step,
both checkpoint directions, and merge where PEFT merges. Options out of scope are refused by name."""

import copy
import json

import peft
import pytest
import torch

import adapt_compiler as ac
from models import tiny_llama, token_batch
from oracle import check_full_parity

QV = ["q_proj", "v_proj"]

CASES = {
    # Llama's projections have no bias to fold lora_B's bias into: neither PEFT nor we merge (merge refuses)
    "lora_bias": (dict(lora_bias=True), dict(lora_bias=True), ("lora_",), False),
    "trainable_token_indices": (dict(trainable_token_indices=[3, 5, 7]), dict(trainable_token_indices=[3, 5, 7]),
                                ("lora_", "trainable_tokens_delta"), True),
    "bdlora": (dict(use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"],
                                                 nblocks=2)),
               dict(use_bdlora=dict(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2,
                                    match_strict=True)), ("lora_",), True),
    # an empty or partial variant dict means PEFT's defaults for the rest (it once meant "off", silently)
    "kasa": (dict(kasa_config=peft.KasaConfig()), dict(kasa_config={}),
             ("lora_A", "lora_B", "lora_diag"), True),
    "velora": (dict(velora_config=peft.VeloraConfig(num_groups=4)),
               dict(velora_config=dict(num_groups=4)), ("lora_A", "lora_B"), True),
    "pissa": (dict(init_lora_weights="pissa"), dict(init="pissa"), ("lora_",), True),
    "olora": (dict(init_lora_weights="olora"), dict(init="olora"), ("lora_",), True),
    "mica": (dict(init_lora_weights="mica"), dict(init="mica"), ("lora_A",), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_option_matches_peft(case, tmp_path):
    peft_kw, our_kw, keys, merge = CASES[case]
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, **peft_kw)
    spec = ac.LoRA(r=4, alpha=8, targets=QV, **our_kw)
    check_full_parity(base, token_batch(), cfg, spec, tmp_path, keys=keys, merge=merge)


def test_a_variant_field_peft_does_not_have_is_refused_by_name():
    with pytest.raises(ac.AdapterError, match="kasa_config has no field 'betta'"):
        ac.LoRA(r=4, targets=QV, kasa_config={"betta": 1e-4})


def test_lora_bias_merge_refused_without_a_base_bias():
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=QV, lora_bias=True), lowering="eager")
    with pytest.raises(ac.AdapterError, match="lora_bias"):
        m.merge()


def test_mica_keeps_b_frozen_and_says_so(tmp_path):
    """PEFT freezes MiCA's lora_B; so do we, and the saved config says init_lora_weights="mica"."""
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=QV, init="mica"), lowering="eager")
    names = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if "lora_" in n and p.requires_grad}
    assert names == {"lora_A"}
    m.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "mica"


def _tiny_mixtral():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           use_cache=False)
    return tf.MixtralForCausalLM(cfg).eval()


def test_target_parameters_on_moe_experts(tmp_path):
    """target_parameters on Mixtral's fused 3-D expert weights (PEFT's ParamWrapper)."""
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=targets)
    spec = ac.LoRA(r=4, alpha=8, targets=[], target_parameters=targets)
    check_full_parity(_tiny_mixtral(), token_batch(), cfg, spec, tmp_path, keys=("lora_",))


@pytest.mark.parametrize("field, value, words", [
    ("use_qalora", True, ["use_qalora is not supported"]),
    ("layer_replication", [[0, 1]], ["layer_replication is not supported"]),
    ("init_lora_weights", "loftq", ["init='loftq'", "quantized"]),
])
def test_out_of_scope_options_refused_by_name(field, value, words, tmp_path):
    """A PEFT directory with an out-of-scope option is refused naming the option, never blaming the checkpoint."""
    base = tiny_llama()
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ac.AdapterError) as err:
        ac.compile(base, str(tmp_path), lowering="eager")
    for w in words:
        assert w in str(err.value)
    assert "checkpoint made for" not in str(err.value)


def test_a_directory_trained_with_eva_loads_as_peft_loads_it(tmp_path):
    """EVA only chose the starting A and the ranks: its directory is plain LoRA tensors, and PEFT's
    from_pretrained loads it as such. A new EVA adapter waits for its data pass (tests/test_lora_data_init.py)."""
    from oracle import assert_close, randomize_

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    randomize_(pm, ("lora_",))
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "eva",
                                                              "eva_config": {"rho": 2.0}}))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    m = ac.compile(tiny_llama(), str(tmp_path), lowering="eager")
    batch = token_batch()
    with torch.no_grad():
        assert_close(m(**batch).logits, theirs(**batch).logits, what="EVA directory")
    fresh = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=QV, init="eva"), lowering="eager")
    with pytest.raises(ac.AdapterError, match="initialize_eva"):
        fresh(**batch)



def test_target_parameters_on_2d_weights(tmp_path):
    """target_parameters on plain 2-D weights (PEFT's ParamWrapper on an nn.Linear's weight): W' = W + s·B·A
    wherever the graph reads W; both checkpoint directions, a step, merge."""
    targets = ["self_attn.q_proj.weight", "mlp.down_proj.weight"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=targets)
    spec = ac.LoRA(r=4, alpha=8, targets=[], target_parameters=targets)
    m = check_full_parity(tiny_llama(layers=1), token_batch(), cfg, spec, tmp_path, keys=("lora_",))
    assert sorted(s.layer.fqn for s in m.table.slots.values()) == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_weight_conversion_to_plain_lora_matches_peft(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...): a trained PiSSA adapter written as plain
    LoRA of rank 2r over the original weights ([A; A0], [B, -B0]), as PEFT writes it; it loads on the
    untouched base model, in PEFT and here, with the trained outputs."""
    from safetensors.torch import load_file

    from oracle import assert_close, call_model, logits_of, train_then_save_converted

    base, batch = tiny_llama(layers=1), token_batch()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV,
                                                                   init_lora_weights="pissa"))
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=QV, init="pissa"), lowering="eager")
    want = train_then_save_converted(pm, m, batch, tmp_path)
    for name in ("adapter_config.json",):
        theirs, ours = (json.loads((tmp_path / d / name).read_text()) for d in ("peft", "ours"))
        assert (ours["r"], ours["lora_alpha"], ours["init_lora_weights"]) == (8, 16, True)
        assert (theirs["r"], theirs["lora_alpha"], theirs["init_lora_weights"]) == (8, 16, True)
    assert json.loads((tmp_path / "ours_init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        assert_close(ours[k], theirs[k], what=k)
    loaded = ac.compile(base, str(tmp_path / "ours"), lowering="eager")
    assert_close(logits_of(call_model(loaded, batch)), want, what="converted, ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), want, what="converted, PEFT")
