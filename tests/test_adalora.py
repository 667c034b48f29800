"""AdaLoRA against PEFT: outputs, gradients, orth regulariser, RankAllocator masks, checkpoints."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import adapt_compiler as ac
from adapt_compiler.checkpoint import live_tensor
from models import image_batch, tiny_convnet, tiny_gpt2, tiny_llama, token_batch
from oracle import assert_close, compare_grads, logits_of, ours_from_peft, peft_twin, randomize_

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _pair(base, targets, task_type=None, init_r=4, **kw):
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=2, lora_alpha=8, target_modules=targets, total_step=10,
                             task_type=task_type, **kw)
    pm = peft_twin(base, cfg)
    randomize_(pm, ("lora_",))
    spec = ac.AdaLoRA(init_r=init_r, target_r=2, alpha=8, targets=targets, total_step=10, **kw)
    return ours_from_peft(base, pm, spec), pm


def test_llama_gqa_outputs_grads_and_regulariser_match_peft():
    # task_type=CAUSAL_LM: PEFT's AdaLoraModel.forward adds the orth regulariser to the loss
    m, pm = _pair(tiny_llama(), ATTN, task_type="CAUSAL_LM")
    batch = token_batch(labels=True)
    out, theirs = m(**batch), pm(**batch)
    assert_close(out.logits, theirs.logits)
    reg = m.regularization_loss()
    assert reg.item() > 0
    loss = out.loss + reg  # the user adds it, as PEFT's forward does
    assert_close(loss, theirs.loss, what="loss + orth regulariser")
    loss.backward()
    theirs.loss.backward()
    compare_grads(m, pm)


@pytest.mark.parametrize("net", ["gpt2_conv1d", "conv2d"])
def test_conv1d_and_conv2d_match_peft(net):
    if net == "gpt2_conv1d":
        base, targets, batch = tiny_gpt2(), ["c_attn", "c_proj"], token_batch()
    else:
        base, targets, batch = tiny_convnet(), ["conv1", "conv2", "proj", "down"], image_batch()
    m, pm = _pair(base, targets)
    kwargs, args = (batch, ()) if isinstance(batch, dict) else ({}, (batch,))
    ours, theirs = logits_of(m(*args, **kwargs)), logits_of(pm(*args, **kwargs))
    assert_close(ours, theirs)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    compare_grads(m, pm)


def test_identity_at_init_orders_agree_and_merge_unmerge():
    base = tiny_llama()
    batch = token_batch()
    ref = base(**batch).logits
    fresh = ac.compile(base, ac.AdaLoRA(init_r=4, targets=ATTN, total_step=10), lowering="eager")
    assert_close(fresh(**batch).logits, ref, rtol=1e-6, what="identity at init (E = 0)")

    m, _ = _pair(base, ATTN)
    act = m(**batch).logits
    assert not torch.allclose(act, ref)
    spec = ac.AdaLoRA(init_r=4, target_r=2, targets=ATTN, total_step=10, order="weight")
    weight_side = ac.compile(base, spec, lowering="eager")
    weight_side.load_adapter_state_dict(m.adapter_state_dict())
    assert_close(weight_side(**batch).logits, act, what="weight order vs activation order")
    assert {d.order for d in weight_side.decisions().values()} == {"weight"}
    assert {d.order for d in m.decisions().values()} == {"activation"}

    w0 = {k: t.clone() for k, t in m.table.frozen.items()}
    m.merge()
    assert_close(m(**batch).logits, act, what="merged")
    m.unmerge()
    assert all(torch.equal(m.table.frozen[k], w0[k]) for k in w0), "unmerge must restore W bit-for-bit"
    assert torch.equal(m(**batch).logits, act)


def _grad_pairs(m, pm):
    """(our param, PEFT param) per PEFT state-dict key."""
    theirs = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    return [(live_tensor(m.table, "default", k), theirs[k]) for k in m.adapter_state_dict()]


def _pattern(rank_pattern):
    return {k.replace(".default", ""): v for k, v in (rank_pattern or {}).items()}


def test_rank_allocation_matches_peft_and_checkpoints_round_trip(tmp_path):
    base = tiny_llama()
    kw = dict(tinit=1, tfinal=2, deltaT=2, beta1=0.8, beta2=0.9, orth_reg_weight=0.1)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=ATTN, total_step=8,
                             task_type="CAUSAL_LM", **kw)
    pm = peft_twin(base, cfg)
    randomize_(pm, ("lora_",), scale=0.3)
    spec = ac.AdaLoRA(init_r=6, target_r=2, alpha=8, targets=ATTN, total_step=8, **kw)
    m = ours_from_peft(base, pm, spec)
    m.train()
    pm.train()
    pairs = _grad_pairs(m, pm)
    opt_ours = torch.optim.SGD(m.adapter_parameters(), lr=0.5)
    opt_peft = torch.optim.SGD([p for _, p in pairs], lr=0.5)
    masked_steps = 0
    for step in range(8):
        batch = token_batch(seed=step, labels=True)
        out = m(**batch)
        (out.loss + m.regularization_loss()).backward()
        pm(**batch).loss.backward()
        compare_grads(m, pm)
        # drive both allocators with identical gradients (ours), so the masks can be compared exactly
        for ours, theirs in pairs:
            theirs.grad.copy_(ours.grad)
        opt_ours.step()
        opt_peft.step()
        m.update_and_allocate(step)
        pm.base_model.update_and_allocate(step)
        for ours, theirs in pairs:
            assert torch.equal(ours, theirs), "weights (incl. masked E) must stay identical"
        ours_pattern = m.state.specs["default"].rank_pattern
        assert _pattern(ours_pattern) == _pattern(pm.peft_config["default"].rank_pattern), f"step {step}"
        masked_steps += ours_pattern is not None
        opt_ours.zero_grad()
        opt_peft.zero_grad()
    final = m.state.specs["default"].rank_pattern
    assert masked_steps >= 4
    assert sum(map(sum, final.values())) == 2 * len(final), "target budget: target_r per layer"
    assert any(len(set(v)) > 1 for v in final.values())

    # ours -> PEFT: pruned ranks dropped, rank_pattern in the config; PEFT resizes on load
    m.eval()
    pm.eval()
    batch = token_batch()
    ref = m(**batch).logits
    assert_close(ref, pm(**batch).logits, what="after allocation")
    m.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == final
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    keep = sum(final["model.layers.0.self_attn.q_proj.lora_E"])
    assert saved[f"{key}.lora_A"].shape == (keep, 64) and saved[f"{key}.lora_B"].shape == (64, keep)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(loaded(**batch)), ref, what="PEFT loading ours")

    # PEFT -> ours: the resized layers keep ranknum = init_r
    pm.save_pretrained(tmp_path / "peft")
    back = ac.compile(base, tmp_path / "peft", lowering="eager")
    assert_close(back(**batch).logits, ref, what="ours loading PEFT's")
    slot = back.slots["model__layers__0__self_attn__q_proj"]
    assert slot.params("default")["lora_A"].shape[0] == keep
    assert slot.params("default")["ranknum"].item() == 6.0
    back.save_adapter(tmp_path / "again")  # already pruned: saved as is
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_errors_are_clear_and_change_nothing():
    with pytest.raises(ac.AdapterError, match="total_step"):
        ac.AdaLoRA(init_r=4, targets=ATTN)
    with pytest.raises(ac.AdapterError, match="tinit"):
        ac.AdaLoRA(total_step=10, tinit=8, tfinal=2)

    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    net = Grouped()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ac.AdapterShapeError, match="conv.*groups"):
        ac.compile(net, ac.AdaLoRA(targets=["conv"], total_step=10), lowering="eager")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    m = ac.compile(tiny_llama(), ac.AdaLoRA(init_r=4, targets=["q_proj"], total_step=10), lowering="eager")
    with pytest.raises(ac.AdapterError, match="no gradient"):
        m.update_and_allocate(0)
