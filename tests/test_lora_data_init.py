"""Data-driven LoRA initialisations (issue 20): EVA and CorDA against PEFT 0.21.2 on a tiny Llama with the
same seeded data. PEFT hooks the (copied) model; we read the layer inputs at our slots in the eager graph.
Each case checks the factors (and EVA's rank/alpha pattern), outputs, adapter gradients, a training step
and both checkpoint directions; the user's model stays untouched."""

import copy
import json

import peft
import pytest
import torch
from peft.tuners.lora import initialize_lora_eva_weights
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

import adapt_compiler as ac
from models import tiny_llama
from oracle import assert_close, call_model, logits_of, step_both_and_compare

EVA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # q/v share their input (one PCA for both)
CORDA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _eva_data():
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 128, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # padding: not in the PCA
        labels = ids.clone()
        labels[1, :5] = -100  # EVA's label mask: not in the PCA either
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _corda_data():
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(0, 128, (1, 24), generator=g)} for _ in range(4)]  # one sample per call


def _test_batch():
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))}


def _same_state(m, pm):
    theirs, ours = peft.get_peft_model_state_dict(pm), m.adapter_state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert_close(ours[k], theirs[k], what=k)


def _train_step_matches(m, pm, batch):
    return logits_of(step_both_and_compare(m, pm, batch, lr=0.5))


EVA_CASES = {
    "default": dict(rho=2.0, tau=0.8),
    "whiten, fixed scaling": dict(rho=1.5, tau=0.8, whiten=True, adjust_scaling_factors=False),
}


# about 20 s each here (PEFT's pass, ours with its capture, a step, both directions); the second is slow-marked
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c != "default" else [])
                                  for c in sorted(EVA_CASES)])
def test_eva_matches_peft(case, tmp_path):
    base = tiny_llama(layers=1)
    before = copy.deepcopy(base.state_dict())
    data, batch = _eva_data(), _test_batch()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=EVA_TARGETS, init_lora_weights="eva",
                          eva_config=peft.EvaConfig(**EVA_CASES[case]))
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    spec = ac.LoRA(r=4, alpha=8, targets=EVA_TARGETS, init="eva", eva_config=EVA_CASES[case])
    m = ac.compile(base, spec, lowering="eager", init_data=data)

    ours, theirs = m.state.specs["default"], pm.peft_config["default"]
    assert ours.rank_pattern == theirs.rank_pattern and ours.rank_pattern, "EVA redistributed no rank"
    assert ours.alpha_pattern == theirs.alpha_pattern
    assert sorted(s.layer.fqn for s in m.table.slots_of("default")) == sorted(
        n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A"))
    _same_state(m, pm)
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(pm, batch)))
    want = _train_step_matches(m, pm, batch)
    # both checkpoint directions: PEFT saves init_lora_weights="eva" with the rank_pattern; so do we
    pm.save_pretrained(tmp_path / "peft")
    loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert_close(logits_of(call_model(loaded, batch)), want, what="PEFT's EVA dir -> ours")
    m.save_adapter(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"] == theirs.rank_pattern
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), want, what="ours -> PeftModel.from_pretrained")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the user's model changed"


def test_eva_waits_for_its_data_pass_and_says_so():
    m = ac.compile(tiny_llama(layers=1), ac.LoRA(r=4, targets=["q_proj"], init="eva"), lowering="eager")
    assert m.state.specs["default"].eva_config["rho"] == 2.0  # PEFT's EvaConfig defaults
    with pytest.raises(ac.AdapterError, match="initialize_eva"):
        m(**_test_batch())
    ac.initialize_eva(m, _eva_data(), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
    m(**_test_batch())  # ready


@pytest.mark.parametrize("bad, words", [
    (dict(init="eva", eva_config=dict(rho=0.5)), "rho"),
    (dict(init="eva", eva_config=dict(nope=1)), "unknown keys"),
    (dict(init="eva", use_dora=True), "use_dora"),
    (dict(init="corda", corda_config=dict(corda_method="abc")), "corda_method"),
])
def test_data_init_configs_checked(bad, words):
    with pytest.raises(ac.AdapterError, match=words):
        ac.LoRA(r=4, targets=["q_proj"], **bad)


def test_eva_refuses_layers_peft_does_not_compute():
    from torch import nn

    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8))
    with pytest.raises(ac.AdapterError, match="init='eva'") as err:
        ac.compile(model, ac.LoRA(r=2, targets=["0", "1"], init="eva"), lowering="eager")
    assert "random init" in str(err.value)


def _peft_corda(base, method, data, cache=None):
    kw = {} if cache is None else {"cache_file": str(cache)}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CORDA_TARGETS, init_lora_weights="corda",
                          corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method, **kw))
    model = copy.deepcopy(base)
    peft_preprocess_corda(model, cfg, run_model=None if data is None else lambda: [model(**b) for b in data])
    return model, cfg


@pytest.mark.parametrize("method", ["ipm", pytest.param("kpm", marks=pytest.mark.slow)])
def test_corda_matches_peft(method, tmp_path):
    base = tiny_llama(layers=1)
    before = copy.deepcopy(base.state_dict())
    data, batch = _corda_data(), _test_batch()
    residual_base, cfg = _peft_corda(base, method, data)
    pm = peft.get_peft_model(residual_base, cfg)
    spec = ac.LoRA(r=4, alpha=8, targets=CORDA_TARGETS, init="corda", corda_config=dict(corda_method=method))
    m = ac.compile(base, spec, lowering="eager", init_data=data)
    _same_state(m, pm)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert_close(m.table.frozen[q], residual_base.get_submodule(q.removesuffix(".weight")).base_layer.weight,
                 what="residual base")
    assert not torch.equal(m.table.frozen[q], base.get_parameter(q)), "no residual in our copy"
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), what="W at init")
    assert_close(logits_of(call_model(m, batch)), logits_of(call_model(pm, batch)))
    want = _train_step_matches(m, pm, batch)
    m.merge()
    assert_close(logits_of(call_model(m, batch)), want, what="merged")
    m.unmerge()
    # ours -> PEFT, which (as for its own CorDA directories) runs preprocess_corda before from_pretrained
    m.save_adapter(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "corda"
    again, _ = _peft_corda(base, method, data)
    back = peft.PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), want, what="ours -> PeftModel.from_pretrained")
    # PEFT -> ours: the trained factors load, and the residual comes back from the same data
    pm.save_pretrained(tmp_path / "peft")
    loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    with pytest.raises(ac.AdapterError, match="preprocess_corda"):
        loaded(**batch)
    ac.preprocess_corda(loaded, data=data)
    assert_close(logits_of(call_model(loaded, batch)), want, what="PEFT's CorDA dir -> ours")
    m.delete_adapter("default")  # our copy gets W back
    assert torch.equal(m.table.frozen[q], base.get_parameter(q))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the user's model changed"


def test_corda_cache_file_both_ways(tmp_path):
    """corda_config's cache_file: written by the first pass, read (no data) by PEFT and by us."""
    base, data, batch = tiny_llama(layers=1), _corda_data(), _test_batch()
    cache = tmp_path / "cache" / "corda.pt"
    spec = ac.LoRA(r=4, alpha=8, targets=CORDA_TARGETS, init="corda",
                   corda_config=dict(corda_method="ipm", cache_file=str(cache)))
    m = ac.compile(base, spec, lowering="eager", init_data=data)
    assert cache.exists()
    want = logits_of(call_model(m, batch))
    m.save_adapter(tmp_path / "ours")
    from_cache = ac.compile(base, str(tmp_path / "ours"), lowering="eager")  # no data: the cache is read
    assert_close(logits_of(call_model(from_cache, batch)), want, what="reloaded from the cache")
    residual_base, cfg = _peft_corda(base, "ipm", None, cache=cache)  # PEFT reads our cache
    pm = peft.get_peft_model(residual_base, cfg)
    _same_state(m, pm)
    assert_close(logits_of(call_model(pm, batch)), want, what="PEFT from our cache")


def test_corda_refuses_batches_of_several_samples():
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=["q_proj"], init="corda"), lowering="eager")
    with pytest.raises(ac.AdapterError, match="batch size 1"):
        ac.preprocess_corda(m, data=[_test_batch()])
    with pytest.raises(ac.AdapterError, match="preprocess_corda"):
        m(**_test_batch())  # still waiting, nothing half-done


def test_init_data_without_a_data_init_is_refused():
    with pytest.raises(ac.AdapterError, match="init_data"):
        ac.compile(tiny_llama(), ac.LoRA(r=4, targets=["q_proj"]), lowering="eager", init_data=_corda_data())


def test_readme_data_driven_section(capsys):
    """The README's EVA / CorDA / LoRA-GA block runs as written (tiny model, eager lowering) and does what it
    says (LoRA-GA's parity with PEFT: tests/test_lora_ga.py)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("#### Data-driven initialisations", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code.count("init_data=") == 3
    code = re.sub(r"init_data=(\w+)\)", r'init_data=\1, lowering="eager")', code)
    model = tiny_llama(layers=1)
    before = copy.deepcopy(model.state_dict())
    scope = {"model": model, "batches": _eva_data(), "one_sample_batches": _corda_data()}
    exec(compile(code, "README data-driven inits", "exec"), scope)  # noqa: S102 - our own docs
    m, c, g = scope["m"], scope["c"], scope["g"]
    ranks = m.state.specs["default"].rank_pattern
    assert ranks and str(ranks) in capsys.readouterr().out
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(c.table.frozen[w], model.get_parameter(w))  # the residual, in our copy
    assert not torch.equal(g.table.frozen[w], model.get_parameter(w))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    batch = _test_batch()
    assert_close(logits_of(c(**batch)), logits_of(model(**batch)), what="CorDA starts at W")
    assert_close(logits_of(m(**batch)), logits_of(model(**batch)), what="EVA starts at W")
    assert_close(logits_of(g(**batch)), logits_of(model(**batch)), what="LoRA-GA starts at W")


def test_report_shows_the_residual_and_pending_passes():
    model = tiny_llama(layers=1)
    m = ac.compile(model, {"c": ac.LoRA(r=4, targets=["q_proj"], init="corda"),
                           "e": ac.LoRA(r=4, targets=["v_proj"], init="eva")}, lowering="eager")
    text = str(m.report())
    assert "data pass pending (c, init='corda')" in text and "data pass pending (e, init='eva')" in text
    ac.preprocess_corda(m, data=_corda_data(), adapter_name="c")
    text = str(m.report())
    assert "residual base (c, init='corda')" in text and "model.layers.0.self_attn.q_proj.weight" in text
    assert "pending (c" not in text and "pending (e" in text


def test_hf_conv1d_layers_match_peft():
    """GPT-2's Conv1D flattens its input before the matmul; the passes read it at the module's shape, as
    PEFT's hooks do (EVA's token mask indexes (batch, position); CorDA squeezes the batch dimension)."""
    from models import tiny_gpt2

    base, g, targets = tiny_gpt2(), torch.Generator().manual_seed(3), ["c_attn", "c_proj"]
    data = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    data[0]["attention_mask"][1, :4] = 0
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", fan_in_fan_out=True,
                          eva_config=peft.EvaConfig(tau=0.8))
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=targets, init="eva", eva_config=dict(tau=0.8)),
                   lowering="eager", init_data=data)
    assert m.state.specs["default"].rank_pattern == pm.peft_config["default"].rank_pattern
    _same_state(m, pm)
    one = [{"input_ids": torch.randint(0, 64, (1, 20), generator=g)} for _ in range(4)]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", fan_in_fan_out=True)
    residual_base = copy.deepcopy(base)
    peft_preprocess_corda(residual_base, cfg, run_model=lambda: [residual_base(**b) for b in one])
    pm = peft.get_peft_model(residual_base, cfg)
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=targets, init="corda"), lowering="eager", init_data=one)
    _same_state(m, pm)
    batch = _test_batch()
    assert_close(logits_of(m(**batch)), logits_of(pm(**batch)))
