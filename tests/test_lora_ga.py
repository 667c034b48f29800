"""LoRA-GA (init="lora_ga", issue 20) against PEFT 0.21.2's preprocess_loraga + get_peft_model, on a tiny Llama
and GPT-2 with the same seeded data and the same generator seed (the SVD is randomized; we replay PEFT's
draws from the state at adapter creation). PEFT takes the gradients on the (copied) model; we take them in
our graph with no adapter active. Factors and the residual base are compared bitwise; then outputs,
adapter gradients, a training step, merge, both checkpoint directions, PEFT's weight conversion and the
gradient cache file. The user's model is never touched (no .grad, no requires_grad change, same weights)."""

import copy
import json

import peft
import pytest
import torch
from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess_loraga

import adapt_compiler as ac
from models import tiny_gpt2, tiny_llama
from oracle import assert_close, call_model, logits_of, step_both_and_compare, train_then_save_converted

TARGETS = ["q_proj", "v_proj", "down_proj"]
SEED = 11  # seeded before get_peft_model / PeftModel.from_pretrained, and before our ac.compile


def _data(vocab=128, n=3):
    """Training batches with labels (the step backpropagates each batch's loss), label -100 on a few positions."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 10), generator=g)
        labels = ids.clone()
        labels[0, :4] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _test_batch(vocab=128):
    return {"input_ids": torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))}


def _peft_config(targets, lora_ga_config, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig(**lora_ga_config), **kw)


def _peft_preprocessed(base, cfg, data, cache_file=None):
    """A copy of `base` with PEFT's gradients attached (PEFT's documented train_step: forward, loss.backward())."""
    model = copy.deepcopy(base)

    def train_step():
        for batch in data:
            model(**batch).loss.backward()

    peft_preprocess_loraga(model, cfg, train_step, cache_file=cache_file)
    return model


def _peft_lora_ga(base, cfg, data):
    model = _peft_preprocessed(base, cfg, data)
    torch.manual_seed(SEED)
    return peft.get_peft_model(model, cfg)


def _ours(base, spec, data, **kw):
    torch.manual_seed(SEED)
    return ac.compile(base, spec, lowering="eager", init_data=data, **kw)


def _same_start(m, pm):
    """lora_A, lora_B and every residual base weight bitwise equal to PEFT's."""
    theirs, ours = peft.get_peft_model_state_dict(pm), m.adapter_state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), f"{k}: max |diff| {(ours[k] - theirs[k]).abs().max()}"
    adapted = [n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")]
    assert sorted(s.layer.fqn for s in m.table.slots_of("default")) == sorted(adapted)
    for fqn in adapted:
        w = m.table.frozen[f"{fqn}.weight"]
        assert torch.equal(w, pm.get_submodule(f"base_model.model.{fqn}").base_layer.weight), f"{fqn}: residual base"


def _untouched(base, before):
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the user's weights changed"
    assert all(p.grad is None for p in base.parameters()), "the user's parameters got a .grad"
    assert all(p.requires_grad for p in base.parameters()), "the user's requires_grad changed"


def test_lora_ga_matches_peft(tmp_path):
    """PEFT's default LoraGAConfig (ArB2r, stable): the whole contract, checkpoints both ways."""
    base = tiny_llama(layers=1)
    before = copy.deepcopy(base.state_dict())
    data, batch, lcfg = _data(), _test_batch(), dict(direction="ArB2r", scale="stable", stable_gamma=16)
    pm = _peft_lora_ga(base, _peft_config(TARGETS, lcfg), data)
    m = _ours(base, ac.LoRA(r=4, alpha=8, targets=TARGETS, init="lora_ga", lora_ga_config=lcfg), data)
    _same_start(m, pm)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(m.table.frozen[q], base.get_parameter(q)), "no residual in our copy"
    assert (m.adapter_state_dict()["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] != 0).any()
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), what="W at init")
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(pm, batch)))
    assert all(p.requires_grad for p in m.adapter_parameters())
    want = logits_of(step_both_and_compare(m, pm, batch, lr=0.5))
    m.merge()
    assert_close(logits_of(call_model(m, batch)), want, what="merged")
    m.unmerge()
    # ours -> PEFT, which (as for its own LoRA-GA directories) runs preprocess_loraga before from_pretrained
    m.save_adapter(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "lora_ga" and saved["lora_ga_config"] == lcfg
    again = _peft_preprocessed(base, _peft_config(TARGETS, lcfg), data)
    torch.manual_seed(SEED)
    back = peft.PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), want, what="ours -> PeftModel.from_pretrained")
    # PEFT -> ours: the trained factors load and wait for their residual, which the same data rebuilds
    pm.save_pretrained(tmp_path / "peft")
    torch.manual_seed(SEED)
    loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    with pytest.raises(ac.AdapterError, match="preprocess_loraga"):
        loaded(**batch)
    ac.preprocess_loraga(loaded, data=data)
    assert_close(logits_of(call_model(loaded, batch)), want, what="PEFT's LoRA-GA dir -> ours")
    m.delete_adapter("default")  # our copy gets W back
    assert torch.equal(m.table.frozen[q], base.get_parameter(q))
    _untouched(base, before)


# PEFT's other directions and scales: the factors and residual (bitwise), and the output
OTHER_CASES = {
    "random, weight_svd": dict(direction="random", scale="weight_svd", stable_gamma=16),  # randperm + a 2nd SVD
    "ArBr, gd_scale": dict(direction="ArBr", scale="gd_scale", stable_gamma=16),
    "A2rBr, unit": dict(direction="A2rBr", scale="unit", stable_gamma=16),
    "A2rBr, stable 4, rslora": dict(direction="A2rBr", scale="stable", stable_gamma=4),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == "random, weight_svd" else [pytest.mark.slow])
                                  for c in OTHER_CASES])
def test_lora_ga_directions_and_scales(case):
    base, data, batch, lcfg = tiny_llama(layers=1), _data(), _test_batch(), OTHER_CASES[case]
    rs = "rslora" in case
    pm = _peft_lora_ga(base, _peft_config(TARGETS, lcfg, use_rslora=rs, rank_pattern={"down_proj": 2}), data)
    spec = ac.LoRA(r=4, alpha=8, targets=TARGETS, init="lora_ga", lora_ga_config=lcfg, rslora=rs,
                   rank_pattern={"down_proj": 2})
    m = _ours(base, spec, data)
    _same_start(m, pm)
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(pm, batch)))


def test_lora_ga_on_hf_conv1d_matches_peft():
    """GPT-2's Conv1D stores Wᵀ: the gradient is transposed for the SVD and back for the residual, and PEFT's
    "stable" scale reads the stored weight.shape[0] (d_in here), which we mirror."""
    base, data, batch = tiny_gpt2(), _data(), _test_batch()
    lcfg, targets = dict(direction="ArB2r", scale="stable", stable_gamma=16), ["c_attn", "c_proj"]
    pm = _peft_lora_ga(base, _peft_config(targets, lcfg, fan_in_fan_out=True), data)
    m = _ours(base, ac.LoRA(r=4, alpha=8, targets=targets, init="lora_ga", lora_ga_config=lcfg), data)
    _same_start(m, pm)
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), what="W at init")
    step_both_and_compare(m, pm, batch, lr=0.5)


def test_lora_ga_train_step_and_cache_file_both_ways(tmp_path):
    """ac.preprocess_loraga with PEFT's arguments (lora_config, train_step, cache_file): the gradients go to the
    cache in PEFT's format; PEFT reads ours, we read PEFT's, with no data."""
    base, data = tiny_llama(layers=1), _data()
    lcfg = dict(direction="ArB2r", scale="stable", stable_gamma=16)
    cfg, spec = _peft_config(TARGETS, lcfg), ac.LoRA(r=4, alpha=8, targets=TARGETS, init="lora_ga", lora_ga_config=lcfg)
    torch.manual_seed(SEED)
    m = ac.compile(base, spec, lowering="eager")

    def train_step(model):  # PEFT's closes over its model; ours gets the model to run
        for batch in data:
            model(**batch).loss.backward()

    ours_cache = tmp_path / "ours" / "grads.pt"
    ac.preprocess_loraga(m, cfg, train_step, cache_file=str(ours_cache))
    assert ours_cache.exists()

    def no_data():
        raise AssertionError("the cache should have been read")

    model = copy.deepcopy(base)
    peft_preprocess_loraga(model, cfg, no_data, cache_file=str(ours_cache))  # PEFT reads our cache
    torch.manual_seed(SEED)
    _same_start(m, peft.get_peft_model(model, cfg))
    peft_cache = tmp_path / "peft" / "grads.pt"
    pm = _peft_preprocessed(base, cfg, data, cache_file=str(peft_cache))
    torch.manual_seed(SEED)
    pm = peft.get_peft_model(pm, cfg)
    torch.manual_seed(SEED)
    from_cache = ac.compile(base, spec, lowering="eager")
    ac.preprocess_loraga(from_cache, cache_file=str(peft_cache))  # we read PEFT's cache
    _same_start(from_cache, pm)


def test_lora_ga_weight_conversion_matches_peft(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) after training: plain LoRA of rank 2r over
    the original W, tensor for tensor PEFT's; it loads on the untouched base, in PEFT and here."""
    from safetensors.torch import load_file

    base, data, batch = tiny_llama(layers=1), _data(), _test_batch()
    lcfg = dict(direction="ArB2r", scale="stable", stable_gamma=16)
    pm = _peft_lora_ga(base, _peft_config(TARGETS, lcfg), data)
    m = _ours(base, ac.LoRA(r=4, alpha=8, targets=TARGETS, init="lora_ga", lora_ga_config=lcfg), data)
    want = train_then_save_converted(pm, m, batch, tmp_path)
    for d in ("peft", "ours"):
        config = json.loads((tmp_path / d / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True), d
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        assert_close(ours[k], theirs[k], what=k)
    loaded = ac.compile(base, str(tmp_path / "ours"), lowering="eager")  # init True (lora_ga_config inert)
    assert not loaded.table.data_init
    assert_close(logits_of(call_model(loaded, batch)), want, what="converted, ours")
    peft_converted = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert_close(logits_of(call_model(peft_converted, batch)), want, what="PEFT's converted dir, ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), want, what="converted, PEFT")


@pytest.mark.parametrize("bad, words", [
    (dict(lora_ga_config=dict(direction="AB")), "direction='AB'"),
    (dict(lora_ga_config=dict(scale="big")), "scale='big'"),
    (dict(lora_ga_config=dict(stable_gamma=0)), "stable_gamma=0"),
    (dict(lora_ga_config=dict(gamma=2)), "unknown keys"),
    (dict(use_dora=True), "use_dora"),
    (dict(init=True, lora_ga_config=dict(direction="ArBr")), "lora_ga_config is only read with init='lora_ga'"),
])
def test_lora_ga_configs_checked(bad, words):
    with pytest.raises(ac.AdapterError, match=words):
        ac.LoRA(r=4, targets=["q_proj"], **{"init": "lora_ga", **bad})


def test_lora_ga_waits_for_its_pass_and_refuses_bad_steps():
    base = tiny_llama(layers=1)
    before = copy.deepcopy(base.state_dict())
    m = ac.compile(base, ac.LoRA(r=4, targets=["q_proj"], init="lora_ga"), lowering="eager")
    assert m.state.specs["default"].lora_ga_config == dict(direction="ArB2r", scale="stable", stable_gamma=16)
    assert "data pass pending (default, init='lora_ga')" in str(m.report())
    with pytest.raises(ac.AdapterError, match="preprocess_loraga"):
        m(**_test_batch())
    with pytest.raises(ac.AdapterError, match="data=<batches> or train_step="):
        ac.preprocess_loraga(m)
    with pytest.raises(ac.AdapterError, match="train_step must take one argument"):
        ac.preprocess_loraga(m, train_step=lambda: None)
    with pytest.raises(ac.AdapterError, match="no scalar loss"):
        ac.preprocess_loraga(m, data=[_test_batch()])  # no labels: nothing to backpropagate
    with pytest.raises(ac.AdapterError, match="got no gradient"):
        ac.preprocess_loraga(m, train_step=lambda model: model(**_test_batch()))  # no backward
    with pytest.raises(ac.AdapterError, match="lora_config's r=8"):
        ac.preprocess_loraga(m, peft.LoraConfig(r=8, init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig()),
                             data=_data())
    with pytest.raises(ac.AdapterError, match="does not have init='lora_ga'"):
        ac.preprocess_loraga(ac.compile(base, ac.LoRA(r=4, targets=["q_proj"]), lowering="eager"), data=_data())
    _untouched(base, before)  # the failed passes left nothing behind
    assert all(not t.requires_grad and t.grad is None for t in m.table.frozen.values() if isinstance(t, torch.Tensor))
    ac.preprocess_loraga(m, data=_data())
    assert "residual base (default, init='lora_ga')" in str(m.report())
    m(**_test_batch())  # ready
    with pytest.raises(ac.AdapterError, match="already initialised"):
        ac.preprocess_loraga(m, data=_data())
    _untouched(base, before)


def test_lora_ga_refuses_layers_peft_does_not_compute():
    from torch import nn

    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8))
    with pytest.raises(ac.AdapterError, match="init='lora_ga'") as err:
        ac.compile(model, ac.LoRA(r=2, targets=["0", "1"], init="lora_ga"), lowering="eager")
    assert "random init" in str(err.value)


def test_lora_ga_refuses_a_quantized_base():
    """PEFT's preprocess_loraga raises on a quantized target (LoRA-GA needs W's full-precision gradient); so do we,
    by name, when the adapter is created."""
    from quant_models import quantize_by_hand, require

    require("bitsandbytes")
    base = quantize_by_hand(tiny_llama(layers=1), "nf4")
    with pytest.raises(ValueError, match="quantized"):
        _peft_preprocessed(base, _peft_config(["q_proj"], {}), _data())
    with pytest.raises(ac.AdapterError, match="init='lora_ga' over a quantized"):
        ac.compile(base, ac.LoRA(r=4, targets=["q_proj"], init="lora_ga"), lowering="eager")
