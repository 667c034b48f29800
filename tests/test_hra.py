"""HRA against PEFT 0.21.2: outputs and adapter gradients, GS, paired init, merge, checkpoints, regulariser."""

import copy
from functools import partial

import peft
import pytest
import torch

import adapt_compiler as ac
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import (assert_close, call_model, check_vs_peft, logits_of, ours_from_peft,
                    peft_pair, peft_twin, randomize_)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVS = ["conv1", "conv2", "down", "proj"]
KEYS = ("hra_u",)


_pair = partial(peft_pair, keys=KEYS)
_check_vs_peft = partial(check_vs_peft, keys=KEYS)


@pytest.mark.parametrize("gs", [False, True])
def test_llama_gqa_matches_peft(gs):
    _check_vs_peft(tiny_llama(), peft.HRAConfig(r=6, apply_GS=gs, target_modules=ATTN),
                   ac.HRA(r=6, apply_GS=gs, targets=ATTN), token_batch(labels=True), train=True)


@pytest.mark.parametrize("gs", [False, True])
def test_conv_net_matches_peft(gs):
    _check_vs_peft(tiny_convnet(), peft.HRAConfig(r=4, apply_GS=gs, target_modules=CONVS),
                   ac.HRA(r=4, apply_GS=gs, targets=CONVS), image_batch())


def test_identity_at_init_with_paired_columns():
    for base, batch in [(tiny_llama(), token_batch()), (tiny_convnet(), image_batch())]:
        targets = ATTN if isinstance(batch, dict) else CONVS
        m = ac.compile(base, ac.HRA(r=8, targets=targets), lowering="eager")
        u = m.adapter_parameters()[0]
        assert torch.equal(u[:, 0::2], u[:, 1::2])  # PEFT's repeat_interleave pairing
        with torch.no_grad():
            assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), rtol=1e-6)


@pytest.mark.parametrize("gs", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_orders_agree_per_layer(gs, kind):
    from adapt_compiler.passes.method import Layer
    from test_oft import _method_orders_agree

    method, spec = ac.METHODS["hra"], ac.HRA(r=5, apply_GS=gs)
    if kind == "linear":
        layer, x = Layer("lin", "linear", (24, 64), True, torch.float32), torch.randn(3, 5, 64)
    else:
        layer = Layer("conv", "conv2d", (6, 8, 3, 3), True, torch.float32, stride=(2, 1), padding=(1, 0))
        x = torch.randn(2, 8, 9, 11)
    params = {"hra_u": torch.randn(layer.weight_shape[1] * (9 if kind != "linear" else 1), 5)}
    _method_orders_agree(method, spec, layer, params, x)


def test_both_orders_agree_on_model():
    base = tiny_llama()
    pm = peft_twin(base, peft.HRAConfig(r=4, target_modules=ATTN))
    randomize_(pm, ("hra_u",))
    outs = []
    for order in ("activation", "weight"):
        m = ours_from_peft(base, pm, ac.HRA(r=4, targets=ATTN, order=order))
        outs.append(m(**token_batch()).logits)
        assert {d.order for (f, _), d in m.decisions().items() if f == "model.layers.0.self_attn.k_proj"} == {order}
    assert_close(outs[0], outs[1])


def test_merge_exact_and_unmerge_bit_exact():
    base = tiny_llama()
    pm, m = _pair(base, peft.HRAConfig(r=4, target_modules=ATTN), ac.HRA(r=4, targets=ATTN))
    batch = token_batch()
    before = {k: v.clone() for k, v in m.table.frozen.items()}
    ref = m(**batch).logits
    m.merge()
    assert_close(m(**batch).logits, ref)
    pm.merge_adapter()
    assert_close(m(**batch).logits, pm(**batch).logits)
    m.unmerge()
    assert all(torch.equal(before[k], m.table.frozen[k]) for k in before)


def test_checkpoint_round_trips(tmp_path):
    base = tiny_llama()
    pm = peft_twin(base, peft.HRAConfig(r=4, apply_GS=True, target_modules=ATTN))
    randomize_(pm, ("hra_u",))
    batch = token_batch()
    pm.save_pretrained(tmp_path / "peft")
    m = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert m.state.specs["default"].apply_GS
    assert_close(m(**batch).logits, pm(**batch).logits)
    m.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(**batch).logits, pm(**batch).logits)


def test_orthogonality_regulariser():
    base = tiny_llama()
    m = ac.compile(base, ac.HRA(r=4, targets=["q_proj"], orth_reg_weight=0.5), lowering="eager")
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.copy_(torch.linalg.qr(torch.randn(p.shape))[0] * 3.0)  # orthogonal columns: no penalty
    assert m.regularization_loss().abs().item() < 1e-5
    randomize_(m, ("hra_u",))
    reg = m.regularization_loss()
    expected = 0
    for p in m.adapter_parameters():
        u = p / p.norm(dim=0)
        expected = expected + 0.5 * torch.linalg.norm(torch.eye(4) - u.T @ u)
    assert_close(reg, expected)
    reg.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())
    assert ac.compile(base, ac.HRA(r=4, targets=["q_proj"], orth_reg_weight=0)).regularization_loss() == 0


def test_errors_are_raised_at_compile_time():
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ac.AdapterShapeError, match=r"0: HRA cannot adapt a Conv2d with groups=2"):
        ac.compile(conv, ac.HRA(r=2, targets=["0"]))
    with pytest.raises(ac.AdapterError, match="r=0"):
        ac.HRA(r=0)
