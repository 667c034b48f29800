"""Bone / MiSS against PEFT's MiSS: balance (with padding), bat, mini; legacy Bone checkpoints."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import save_file

import adapt_compiler as ac
from models import tiny_gpt2, tiny_llama, token_batch
from oracle import assert_close, compare_grads, ours_from_peft, peft_twin, randomize_

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# tiny_llama: q/o 64 -> 64, k/v 64 -> 32 (grouped-query)
MODES = {
    "balance": (dict(r=16), dict(r=16)),
    "balance_pad": (dict(r=24), dict(r=24)),  # 64 % 24 != 0: x is zero-padded, the last chunk is partial
    "bat": (dict(r=16, init_weights="bat"), dict(r=16, bat=True)),
    "mini": (dict(r=16, init_weights="mini", mini_r=8), dict(r=16, mode="mini", mini_r=8)),
}


def _pair(base, mode, **spec_kw):
    peft_kw, ours_kw = MODES[mode]
    pm = peft_twin(base, peft.MissConfig(target_modules=ATTN, **peft_kw))
    randomize_(pm, ("miss_",))
    return ours_from_peft(base, pm, ac.MiSS(targets=ATTN, **ours_kw, **spec_kw)), pm


@pytest.mark.parametrize("mode", list(MODES))
def test_llama_gqa_matches_peft(mode):
    m, pm = _pair(tiny_llama(), mode)
    if mode in ("bat", "mini"):  # the train graph too (no dropout, so still deterministic)
        m.train()
        pm.train()
    batch = token_batch(labels=True)
    out, theirs = m(**batch), pm(**batch)
    assert_close(out.logits, theirs.logits)
    out.loss.backward()
    theirs.loss.backward()
    compare_grads(m, pm)
    if mode == "bat":  # nonlinear in W: only the weight side exists
        assert {d.order for d in m.decisions().values()} == {"weight"}
    else:  # low-rank on the activation side: chunk-sum then (…, r) @ (r, d_out)
        assert {d.order for d in m.decisions().values()} == {"activation"}


def test_identity_at_init_orders_agree_and_merge_unmerge():
    base = tiny_llama()
    batch = token_batch()
    ref = base(**batch).logits
    for spec in (ac.Bone(r=16, targets=ATTN), ac.Bone(r=16, bat=True, targets=ATTN)):
        assert_close(ac.compile(base, spec, lowering="eager")(**batch).logits, ref, rtol=1e-6, what=spec.mode)

    for mode in ("balance_pad", "bat"):
        m, pm = _pair(base, mode)
        out = m(**batch).logits
        assert not torch.allclose(out, ref)
        if mode == "balance_pad":  # both orders exist: the forced weight side (W + ΔW) agrees
            w = ours_from_peft(base, pm, ac.Bone(r=24, targets=ATTN, order="weight"))
            assert_close(w(**batch).logits, out, what="weight order vs activation order")
            assert {d.order for d in w.decisions().values()} == {"weight"}
        w0 = {k: t.clone() for k, t in m.table.frozen.items()}
        m.merge()
        assert_close(m(**batch).logits, out, what=f"{mode} merged")
        pm.merge_adapter()
        assert_close(m.table.frozen["model.layers.0.self_attn.k_proj.weight"],
                     pm.base_model.model.model.layers[0].self_attn.k_proj.base_layer.weight, what="merged W")
        m.unmerge()
        assert all(torch.equal(m.table.frozen[k], w0[k]) for k in w0), "unmerge must restore W bit-for-bit"
        assert torch.equal(m(**batch).logits, out)


def test_checkpoints_both_ways_and_legacy_bone(tmp_path):
    base = tiny_llama()
    batch = token_batch()
    for mode in ("balance", "bat"):
        m, pm = _pair(base, mode)
        ref = pm(**batch).logits
        # PEFT -> ours
        pm.save_pretrained(tmp_path / f"peft_{mode}")
        assert_close(ac.compile(base, tmp_path / f"peft_{mode}", lowering="eager")(**batch).logits, ref)
        # ours -> PEFT (saved as MISS)
        m.save_adapter(tmp_path / f"ours_{mode}")
        config = json.loads((tmp_path / f"ours_{mode}" / "adapter_config.json").read_text())
        init = True if mode == "balance" else "bat"
        assert config["peft_type"] == "MISS" and config["init_weights"] == init
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"ours_{mode}").eval()
        assert_close(loaded(**batch).logits, ref, what=f"PEFT loading ours ({mode})")

        # a PEFT <= 0.18 Bone directory, written by hand: peft_type BONE, `bone_block` keys
        bone = tmp_path / f"bone_{mode}"
        bone.mkdir()
        cfg = {"peft_type": "BONE", "r": 16, "target_modules": ATTN, "init_weights": init, "bias": "none"}
        (bone / "adapter_config.json").write_text(json.dumps(cfg))
        tensors = {k.replace(".miss_", ".bone_"): v.contiguous() for k, v in m.adapter_state_dict().items()}
        assert all(".bone_block" in k for k in tensors)
        save_file(tensors, str(bone / "adapter_model.safetensors"))
        legacy = ac.compile(base, bone, lowering="eager")
        spec = legacy.state.specs["default"]
        assert isinstance(spec, ac.MiSS) and spec.mode == mode
        assert_close(legacy(**batch).logits, ref, what=f"legacy Bone ({mode})")
        legacy.save_adapter(tmp_path / f"converted_{mode}")  # saved as MiSS
        converted = json.loads((tmp_path / f"converted_{mode}" / "adapter_config.json").read_text())
        assert converted["peft_type"] == "MISS"


@pytest.mark.parametrize(
    "model, spec, match",
    [
        ("llama", ac.Bone(r=24, bat=True, targets=ATTN), r"q_proj: .*divisible by r=24"),
        ("llama", ac.Bone(r=128, targets=ATTN), r"q_proj: .*r=128 is larger than in_features=64"),
        ("llama", ac.Bone(r=16, mode="mini", mini_r=12, targets=ATTN), r"q_proj: .*mini_r=12"),
        ("gpt2", ac.Bone(r=8, targets=["c_attn"]), r"c_attn: .*nn.Linear only"),
    ],
)
def test_shape_errors_are_clear_and_change_nothing(model, spec, match):
    base = tiny_llama() if model == "llama" else tiny_gpt2()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterShapeError, match=match):
        ac.compile(base, spec, lowering="eager")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_spec_modes():
    assert ac.MiSS is ac.Bone
    assert ac.Bone(bat=True).mode == "bat" and ac.Bone(mode="bat").bat
    with pytest.raises(ac.AdapterError):
        ac.Bone(mode="nope")
    with pytest.raises(ac.AdapterError):
        ac.Bone(mode="mini", init=False)
