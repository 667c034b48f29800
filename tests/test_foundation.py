"""Foundation: capture, checkpoints both ways, merge exactness, errors, the Inductor lowering."""

import copy
import json

import peft
import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.passes import COUNTERS
from models import image_batch, tiny_convnet, tiny_gpt2, tiny_llama, token_batch
from oracle import assert_close, peft_twin, randomize_

pytestmark = pytest.mark.real_capture  # these tests are about capture itself: no capture memo (conftest.py)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _trained_peft(base, cfg, seed=0):
    pm = peft_twin(base, cfg)
    randomize_(pm, ("lora_",), seed=seed)
    return pm


def test_one_capture_serves_every_batch_size_and_length():
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=ATTN), lowering="eager")
    before = COUNTERS["captures"]
    for b, s in [(2, 7), (3, 11), (1, 5), (4, 16)]:
        m(**token_batch(batch=b, seq=s))
    assert COUNTERS["captures"] - before == 1
    m.train()
    m(**token_batch(batch=2, seq=9))
    assert COUNTERS["captures"] - before == 2, "a new mode gets its own graph"


def test_positional_inputs_and_model_output():
    base = tiny_convnet()
    m = ac.compile(base, ac.LoRA(r=2, targets=["proj"], init=False), lowering="eager")
    x = image_batch()
    out = m(x)
    assert out.shape == base(x).shape
    assert not torch.allclose(out, base(x))


def test_peft_checkpoint_loads_into_us(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_rslora=True)
    pm = _trained_peft(base, cfg)
    pm.save_pretrained(tmp_path)
    m = ac.compile(base, str(tmp_path), lowering="eager")
    batch = token_batch()
    assert_close(m(**batch).logits, pm(**batch).logits)
    assert m.state.specs["default"].rslora


def test_our_checkpoint_loads_into_peft(tmp_path):
    base = tiny_gpt2()
    m = ac.compile(base, ac.LoRA(r=4, alpha=16, targets=["c_attn"], use_dora=True, init=False), lowering="eager")
    randomize_(m, ("lora_",))
    m.save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    batch = token_batch()
    assert_close(m(**batch).logits, pm(**batch).logits)


def test_several_adapters_save_in_peft_layout(tmp_path):
    base = tiny_llama()
    m = ac.compile(base, {"math": ac.LoRA(r=2, targets=["q_proj"], init=False),
                          "code": ac.LoRA(r=4, targets=["v_proj"], init=False)}, lowering="eager")
    m.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "code" / "adapter_config.json").exists()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, adapter_name="math").eval()
    pm.load_adapter(tmp_path / "code", adapter_name="code")
    batch = token_batch()
    for name in ("math", "code"):
        m.set_adapter(name)
        pm.set_adapter(name)
        assert_close(m(**batch).logits, pm(**batch).logits, what=name)


@pytest.mark.parametrize("factory,targets,batch", [
    (tiny_llama, ATTN + ["embed_tokens"], token_batch),
    (tiny_gpt2, ["c_attn", "c_fc"], token_batch),
    (tiny_convnet, ["conv1", "down", "proj"], image_batch),
])
@pytest.mark.parametrize("dora", [False, True])
def test_merge_is_exact_and_unmerge_bit_exact(factory, targets, batch, dora):
    base = factory()
    if dora and "embed_tokens" in targets:
        targets = ATTN
    m = ac.compile(base, ac.LoRA(r=4, targets=targets, use_dora=dora, init=False), lowering="eager")
    randomize_(m, ("lora_",), scale=0.2)
    originals = {k: v.clone() for k, v in m.state_dict().items()}
    inputs = batch()
    call = (lambda: m(**inputs)) if isinstance(inputs, dict) else (lambda: m(inputs))
    ref = call()
    ref = ref.logits if hasattr(ref, "logits") else ref
    m.merge()
    merged = call()
    merged = merged.logits if hasattr(merged, "logits") else merged
    assert_close(merged, ref, rtol=1e-5, atol=1e-5, what="merged vs unmerged")
    plain = m.merged_module()
    out = plain(**inputs) if isinstance(inputs, dict) else plain(inputs)
    assert_close(out.logits if hasattr(out, "logits") else out, ref, rtol=1e-5, atol=1e-5, what="merged_module")
    m.unmerge()
    assert all(torch.equal(originals[k], v) for k, v in m.state_dict().items())


def test_merged_module_generates():
    base = tiny_llama()
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    plain = m.merged_module()
    assert type(plain) is type(base)
    out = plain.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_merge_true_graph_has_no_adapter_nodes():
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=ATTN, init=False), merge=True, lowering="eager")
    batch = token_batch()
    m(**batch)
    gm = m.latest_graph("merged")
    assert not [n for n in gm.graph.nodes if "adapter" in n.meta]
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and "ac_slots" in str(n.target)]


def test_train_and_eval_keep_their_own_evaluation_orders():
    """At T=1024, d=256 the eval graph folds LoRA into W (cheaper without a backward) while training
    keeps the activation side; an eval pass in between must not switch the training graph's order."""
    m = ac.compile(tiny_llama(layers=1, hidden=256), ac.LoRA(r=8, targets=["q_proj"]), lowering="eager")
    batch = token_batch(batch=2, seq=512, labels=True)
    m.train()
    m(**batch)
    m.eval()
    with torch.no_grad():
        m(**batch)
    assert {d.order for d in m.decisions().values()} == {"weight"}
    m.train()
    assert {d.order for d in m.decisions().values()} == {"activation"}
    assert {r.order for r in m.report().rows} == {"activation"}


def test_errors_are_clear():
    base = tiny_llama()
    with pytest.raises(ac.AdapterError, match=r"matched no module.*q_proj"):
        ac.compile(base, ac.LoRA(targets=["q_prj"]))
    with pytest.raises(ac.AdapterError, match="r=0 must be a positive integer"):
        ac.LoRA(r=0)
    with pytest.raises(ac.AdapterError, match="alpha"):
        ac.LoRA(r=4, alpha=-1)
    with pytest.raises(ac.AdapterError, match="cannot adapt"):
        ac.compile(base, ac.LoRA(targets=["input_layernorm"]))


def test_checkpoint_that_does_not_fit_lists_mismatches(tmp_path):
    base = tiny_llama()
    small = tiny_llama(hidden=32, heads=2, kv_heads=1)
    pm = _trained_peft(small, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    state = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterError, match=r"shape mismatches.*q_proj"):
        ac.compile(base, str(tmp_path))
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())


def test_unexportable_model_names_the_problem():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return self.lin(x)
            return -self.lin(x)

    m = ac.compile(Branchy(), ac.LoRA(r=2, targets=["lin"]), lowering="eager")
    with pytest.raises(ac.AdapterError, match="could not capture Branchy"):
        m(torch.randn(2, 4))


def test_inductor_lowering_matches_eager_and_trains():
    """The one torch.compile test of the foundation (CPU Inductor emits C++)."""
    base = tiny_llama(layers=1)
    pm = _trained_peft(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    from peft import get_peft_model_state_dict

    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=ATTN))  # default lowering: inductor
    m.load_adapter_state_dict(get_peft_model_state_dict(pm))
    m.train()
    pm.train()
    batch = token_batch(labels=True)
    ours, theirs = m(**batch), pm(**batch)
    assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    from oracle import compare_grads

    compare_grads(m, pm, rtol=1e-4, atol=1e-6)
