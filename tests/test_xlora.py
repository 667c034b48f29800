"""X-LoRA against PEFT (in-memory models: PEFT 0.21.2's own save is lossy): outputs, scalings,
classifier gradients, the dual pass in one graph, the batched expert mixture, checkpoints."""

import copy
import json

import peft
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import adapt_compiler as ac
from models import tiny_llama, token_batch
from oracle import assert_close, randomize_

# experts with different ranks, alphas and target sets (PEFT numbers layers over their union)
EXPERTS = [(["q_proj", "v_proj"], 4), (["v_proj", "o_proj", "down_proj"], 2), (["q_proj"], 3)]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    """Three PEFT LoRA checkpoints of tiny_llama with random (trained-looking) weights, named "0".."2"."""
    base = tiny_llama()
    dirs = {}
    for i, (targets, r) in enumerate(EXPERTS):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        randomize_(pm, ("lora_",), seed=10 + i, scale=0.3)
        d = tmp_path_factory.mktemp(f"expert{i}")
        pm.save_pretrained(d)
        dirs[str(i)] = str(d)
    return dirs


def _pair(base, dirs, **kw):
    px = peft.get_peft_model(copy.deepcopy(base), peft.XLoraConfig(hidden_size=64, adapters=dirs, **kw))
    randomize_(px, ("internal_xlora_classifier",), seed=7, scale=0.5)  # a trained-looking classifier
    m = ac.compile(base, ac.XLoRA(experts=dirs, **kw), lowering="eager")  # experts from PEFT LoRA dirs
    m.load_adapter_state_dict({k: v for k, v in px.state_dict().items() if "internal_xlora_classifier" in k})
    return m, px


def _classifier_grads_match(m, px):
    ours = m.graph_adapters["default"].internal_xlora_classifier
    n = 0
    for name, p in px.named_parameters():
        if p.requires_grad:
            assert "internal_xlora_classifier" in name, f"PEFT trains {name}"
            mine = ours.get_parameter(name.split("internal_xlora_classifier.")[1])
            assert_close(mine.grad, p.grad, what=f"grad {name}")
            n += 1
    assert n == len(m.adapter_parameters()) > 0


VARIANTS = {
    "default": dict(xlora_depth=1),
    "layerwise_deep": dict(layerwise_scalings=True, xlora_depth=3, xlora_size=16, xlora_dropout_p=0.0,
                           softmax_temperature=0.7, global_scaling_weight=1.3),
    "topk_softmax_pass": dict(top_k_lora=2, enable_softmax=False, enable_softmax_topk=True,
                              scaling_pass_value=0.5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_peft(expert_dirs, variant):
    base = tiny_llama()
    m, px = _pair(base, expert_dirs, **VARIANTS[variant])
    batch = token_batch()  # with an attention mask (left padding)
    theirs = px(**batch).logits
    assert_close(m(**batch).logits, theirs, what="eval")
    assert_close(m.xlora_scalings(), px.base_model.get_latest_scalings(), what="scalings")
    assert m.xlora_scalings().shape == (2, 7, 8, 3)  # q, v, o, down in 2 blocks; 3 experts
    assert (theirs - base(**batch).logits).abs().max() > 1e-3
    m.train()
    px.train()
    ours, theirs = m(**batch).logits, px(**batch).logits
    assert_close(ours, theirs, what="train")
    ours.square().mean().backward()
    theirs.square().mean().backward()
    _classifier_grads_match(m, px)


def test_one_graph_batched_experts_frozen(expert_dirs):
    m = ac.compile(tiny_llama(), ac.XLoRA(experts=expert_dirs), lowering="eager")
    assert [n for n, _ in m.named_adapter_parameters()] == [
        "graph_adapters.default.internal_xlora_classifier.layers.0.weight",
        "graph_adapters.default.internal_xlora_classifier.layers.0.bias",
    ]
    m.set_adapter("default")  # re-activating must not unfreeze the experts
    assert len(m.adapter_parameters()) == 2
    batch = token_batch()
    m(**batch)
    gm = m.latest_graph()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("ac_graph_default.internal_xlora_classifier") == 1  # both passes in this one graph
    assert sum("experts." in c for c in calls) == 8  # scaling_pass_value=0: the scaling pass is plain
    assert sum(n.target is torch.ops.aten.detach.default for n in gm.graph.nodes) == 1
    # the mixture: base + one GEMM for all A's + one for all B's, however many experts a layer has
    bank = m.graph_adapters["default"].experts["model__layers__0__self_attn__q_proj"]
    assert bank.lora_A.shape == (4 + 3, 64)  # experts 0 (r=4) and 2 (r=3)
    counted = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                counted.append(1)
            return func(*args, **(kwargs or {}))

    with m.disable_adapters():
        assert torch.equal(m(**batch).logits, tiny_llama()(**batch).logits)
    x = torch.randn(2, 7, 64)
    with Count():
        bank(x, torch.randn(64, 64), None, torch.rand(2, 7, 5, 3))
    assert len(counted) == 3


def test_identity_at_init_with_lora_spec_experts_and_dropout():
    base = tiny_llama()
    experts = {"a": ac.LoRA(r=4, targets=["q_proj", "v_proj"], dropout=0.3), "b": ac.LoRA(r=2, targets=["v_proj"])}
    m = ac.compile(base, ac.XLoRA(experts=experts, xlora_dropout_p=0.0), lowering="eager")
    batch = token_batch()
    assert_close(m(**batch).logits, base(**batch).logits, rtol=0, atol=0, what="LoRA B = 0: the base model")
    with torch.no_grad():
        for bank in m.graph_adapters["default"].experts.values():
            bank.lora_B.normal_()
    m.train()
    a, b = m(**batch).logits, m(**batch).logits
    assert not torch.allclose(a, b), "expert dropout acts in training"
    m.eval()
    assert torch.equal(m(**batch).logits, m(**batch).logits)


def test_checkpoint_intended_layout_round_trip(expert_dirs, tmp_path):
    base = tiny_llama()
    kw = VARIANTS["layerwise_deep"]
    m, px = _pair(base, expert_dirs, **kw)
    batch = token_batch()
    want = px(**batch).logits
    m.save_adapter(tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA"
    assert config["adapters"] == {n: str((tmp_path / "x" / n).resolve()) for n in "012"}
    keys = safetensors.torch.load_file(tmp_path / "x" / "adapter_model.safetensors")
    assert sorted(keys) == sorted(k for k in px.state_dict() if "internal_xlora_classifier" in k)
    assert all(k.startswith("base_model.internal_xlora_classifier.layers.") for k in keys)
    again = ac.compile(tiny_llama(), str(tmp_path / "x"), lowering="eager")
    assert_close(again(**batch).logits, want, what="ours -> ac.compile")
    # every expert folder is a PEFT LoRA checkpoint, and PEFT loads the layout with its experts
    for name in "012":
        assert peft.PeftConfig.from_pretrained(tmp_path / "x" / name).peft_type == "LORA"
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "x")
    assert_close(back(**batch).logits, want, what="ours -> PeftModel.from_pretrained")
    moved = tmp_path / "moved"
    (tmp_path / "x").rename(moved)  # stale absolute expert paths: found again as <root>/<name>
    assert_close(ac.compile(tiny_llama(), str(moved), lowering="eager")(**batch).logits, want, what="moved")
    with pytest.raises(ac.AdapterError, match="expert"):
        ac.compile(tiny_llama(), ac.XLoRA(experts={"0": str(moved)}))  # an XLORA dir is no expert
