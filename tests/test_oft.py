"""OFT against PEFT 0.21.2: outputs and adapter gradients, both evaluation orders, merge, checkpoints.

PEFT's Conv2d forward with kernel > 1 is wrong (it folds overlapping patches), so convs with k > 1
are checked against our own merged form; the 1×1 conv is checked against PEFT.
"""

import copy
from functools import partial

import peft
import pytest
import torch

import adapt_compiler as ac
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import (assert_close, call_model, check_vs_peft, logits_of, ours_from_peft,
                    peft_pair, peft_twin, randomize_, square_loss)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVS = ["conv1", "conv2", "down", "proj"]
KEYS = ("oft_R",)


_pair = partial(peft_pair, keys=KEYS)
_check_vs_peft = partial(check_vs_peft, keys=KEYS)


OPTIONS = {
    "neumann5": dict(oft_block_size=16),
    "neumann3": dict(oft_block_size=16, num_cayley_neumann_terms=3),
    "exact": dict(oft_block_size=8, use_cayley_neumann=False),
    "r_blocks": dict(r=4, oft_block_size=0),
    "block_share": dict(oft_block_size=16, block_share=True),
    "coft": dict(oft_block_size=16, coft=True, eps=0.3),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_llama_gqa_matches_peft(option):
    kw = OPTIONS[option]
    cfg = peft.OFTConfig(target_modules=ATTN, **kw)
    _check_vs_peft(tiny_llama(), cfg, ac.OFT(targets=ATTN, **kw), token_batch())


def test_llama_train_mode_matches_peft():
    kw = dict(oft_block_size=16, use_cayley_neumann=False)
    cfg = peft.OFTConfig(target_modules=ATTN + ["gate_proj", "down_proj"], **kw)
    spec = ac.OFT(targets=ATTN + ["gate_proj", "down_proj"], **kw)
    _check_vs_peft(tiny_llama(), cfg, spec, token_batch(labels=True), train=True)


def test_conv_1x1_matches_peft():
    kw = dict(oft_block_size=4)
    _check_vs_peft(tiny_convnet(), peft.OFTConfig(target_modules=["proj"], **kw),
                   ac.OFT(targets=["proj"], **kw), image_batch())


@pytest.mark.parametrize("order", ["activation", "weight"])
def test_conv_kxk_equals_merged_form(order):
    """k > 1: the rotation acts on the (c, i, j) patch dims, so forward == conv with W·BD(R)ᵀ."""
    base = tiny_convnet()
    m = ac.compile(base, ac.OFT(targets=CONVS, oft_block_size=8, order=order, init_weights=False),
                   lowering="eager")
    x = image_batch()
    out = m(x)
    merged = m.merged_module()
    assert_close(out, merged(x))
    # PEFT's parameter shapes (r = d_in·k·k / b rows) so checkpoints interoperate
    assert m.slots["block1__conv1"].params("default")["oft_R"].shape == (8 * 9 // 8, 28)


def test_identity_at_init():
    for base, spec, batch, targets in [
        (tiny_llama(), ac.OFT(targets=ATTN, oft_block_size=16), token_batch(), ATTN),
        (tiny_convnet(), ac.OFT(targets=CONVS, oft_block_size=8), image_batch(), CONVS),
    ]:
        m = ac.compile(base, spec, lowering="eager")
        with torch.no_grad():
            assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), rtol=1e-6)


def _method_orders_agree(method, spec, layer, params, x):
    """activation order (forward) == weight order (base op with merged_weight), outputs and grads."""
    outs, grads = [], []
    for order in ("activation", "weight"):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        w = torch.randn(layer.weight_shape, generator=torch.Generator().manual_seed(7))
        b = torch.randn(layer.out_features, generator=torch.Generator().manual_seed(8))
        if order == "activation":
            y = method.forward(spec, layer, p, x, w, b, training=False)
        else:
            y = layer.base(x, *method.merged_weight(spec, layer, p, w, b))
        y.square().sum().backward()
        outs.append(y)
        grads.append({k: v.grad for k, v in p.items()})
    assert_close(outs[0], outs[1])
    for k in grads[0]:
        assert_close(grads[0][k], grads[1][k], what=f"grad {k}")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_orders_agree_per_layer(option, kind):
    from adapt_compiler.passes.method import Layer

    method = ac.METHODS["oft"]
    spec = ac.OFT(**OPTIONS[option])
    if kind == "linear":
        layer, x = Layer("lin", "linear", (24, 64), True, torch.float32), torch.randn(3, 5, 64)
    else:
        k = 1 if kind == "conv1x1" else 3
        layer = Layer("conv", "conv2d", (6, 16 if k == 1 else 32, k, k), True, torch.float32,
                      stride=(2, 1), padding=(1, 0), dilation=(1, 2) if k == 3 else (1, 1))
        x = torch.randn(2, layer.weight_shape[1], 9, 11)
    params = method.init_params(spec, layer, torch.empty(layer.weight_shape))
    params = {k: torch.randn_like(v) * 0.1 for k, v in params.items()}
    _method_orders_agree(method, spec, layer, params, x)


def test_both_orders_agree():
    option = "neumann5"
    base = tiny_llama()
    cfg = peft.OFTConfig(target_modules=ATTN, **OPTIONS[option])
    pm = peft_twin(base, cfg)
    randomize_(pm, ("oft_R",))
    outs, grads = [], []
    for order in ("activation", "weight"):
        m = ours_from_peft(base, pm, ac.OFT(targets=ATTN, order=order, **OPTIONS[option]))
        out = m(**token_batch()).logits
        square_loss(out).backward()
        assert {d.order for (f, _), d in m.decisions().items() if f == "model.layers.0.self_attn.q_proj"} == {order}
        outs.append(out)
        grads.append([p.grad.clone() for p in m.adapter_parameters()])
    assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        assert_close(a, b, what="grad")


def test_conv_orders_agree():
    base = tiny_convnet()
    outs = []
    for order in ("activation", "weight"):
        torch.manual_seed(3)
        m = ac.compile(base, ac.OFT(targets=CONVS, oft_block_size=8, order=order, init_weights=False),
                       lowering="eager")
        outs.append(m(image_batch()))
    assert_close(outs[0], outs[1])


def test_merge_exact_and_unmerge_bit_exact():
    base = tiny_llama()
    pm, m = _pair(base, peft.OFTConfig(target_modules=ATTN, oft_block_size=16), ac.OFT(targets=ATTN, oft_block_size=16))
    batch = token_batch()
    before = {k: v.clone() for k, v in m.table.frozen.items()}
    ref = m(**batch).logits
    m.merge()
    assert_close(m(**batch).logits, ref)
    pm.merge_adapter()
    assert_close(m(**batch).logits, pm(**batch).logits)
    m.unmerge()
    assert all(torch.equal(before[k], m.table.frozen[k]) for k in before)
    assert_close(m(**batch).logits, ref)


def test_checkpoint_round_trips(tmp_path):
    base = tiny_llama()
    kw = dict(oft_block_size=16, coft=False, use_cayley_neumann=True)
    pm = peft_twin(base, peft.OFTConfig(target_modules=ATTN, **kw))
    randomize_(pm, ("oft_R",))
    batch = token_batch()
    pm.save_pretrained(tmp_path / "peft")
    m = ac.compile(base, str(tmp_path / "peft"), lowering="eager")  # PEFT dir -> ours
    assert_close(m(**batch).logits, pm(**batch).logits)
    m.save_adapter(tmp_path / "ours")  # ours -> PEFT
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(**batch).logits, pm(**batch).logits)


def test_checkpoint_with_adjusted_block_size(tmp_path):
    """PEFT moves a non-dividing oft_block_size (with a warning) but saves the requested one."""
    base = tiny_llama()
    with pytest.warns(UserWarning):
        pm = peft_twin(base, peft.OFTConfig(target_modules=["q_proj"], oft_block_size=15))
    randomize_(pm, ("oft_R",))
    pm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="using the tensors"):
        m = ac.compile(base, str(tmp_path), lowering="eager")
    assert m.state.specs["default"].oft_block_size == 16
    assert_close(m(**token_batch()).logits, pm(**token_batch()).logits)


def test_block_size_errors_name_layer_and_sizes():
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterShapeError, match=r"q_proj.*oft_block_size=5.*d_in=64.*valid.*\b4\b.*\b8\b"):
        ac.compile(base, ac.OFT(targets=ATTN, oft_block_size=5))
    with pytest.raises(ac.AdapterShapeError, match=r"conv1.*d_in·kh·kw=72"):
        ac.compile(tiny_convnet(), ac.OFT(targets=["conv1"], oft_block_size=16))
    with pytest.raises(ac.AdapterError, match="exactly one"):
        ac.OFT(r=4, oft_block_size=8)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_module_dropout_acts_only_in_training():
    """PEFT 0.21.2 builds the dropout layer but never calls it; we apply it (int(p·r) blocks -> I)."""
    base = tiny_llama()
    kw = dict(oft_block_size=8, module_dropout=0.5)
    pm, m = _pair(base, peft.OFTConfig(target_modules=ATTN, **kw), ac.OFT(targets=ATTN, **kw))
    batch = token_batch()
    assert_close(m(**batch).logits, pm(**batch).logits)  # eval: no dropout
    m.train()
    torch.manual_seed(5)
    a = m(**batch).logits
    torch.manual_seed(5)
    b = m(**batch).logits
    c = m(**batch).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # exactly int(0.5·8) of the 8 blocks become the identity
    from adapt_compiler.passes.oft import multiplicative_dropout

    blocks = torch.randn(8, 3, 3)
    out = multiplicative_dropout(blocks, 0.5)
    assert sum(torch.equal(o, torch.eye(3)) for o in out) == 4


def test_cost_model_prefers_weight_side_for_many_tokens():
    from adapt_compiler.lowering import cost
    from adapt_compiler.passes.oft import OFTMethod

    m = ac.compile(tiny_llama(), ac.OFT(targets=["q_proj"], oft_block_size=16), lowering="eager")
    m(**token_batch())
    slot = m.slots["model__layers__0__self_attn__q_proj"]
    assert m.decisions()[(slot.layer.fqn, "default")].order == "activation"  # T = 14 tokens < d_out = 64
    flops = OFTMethod().cost(m.state.specs["default"], slot.layer, cost.TOKENS)
    assert cost.choose(flops, 4096).order == "weight"



def test_module_dropout_mask_compiles_with_inductor():
    """Regression (issue 20): the mask was built as `mask[torch.randperm(k)]`, which Inductor failed to
    compile (BackendCompilerFailed ... slice_shape), so training with module_dropout under the default
    lowering crashed. Compiled as the default lowering compiles it (fallback_random, fullgraph, with
    its backward), it now draws the eager mask for the same seed: PEFT's mask construction
    (cat(ones, zeros)[randperm]) on the same draw. (PEFT 0.21.2 itself never applies this dropout.)"""
    import torch._inductor.config as inductor_config

    from adapt_compiler.passes.oft import multiplicative_dropout

    blocks = torch.randn(8, 3, 3, requires_grad=True)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(multiplicative_dropout, backend="inductor", fullgraph=True)
        torch.manual_seed(3)
        ours = compiled(blocks, 0.5)
        ours.square().sum().backward()
    torch.manual_seed(3)
    perm = torch.randperm(8)
    peft_mask = torch.cat([torch.ones(4), torch.zeros(4)])[perm].view(8, 1, 1)
    want = (1 - peft_mask) * blocks + peft_mask * torch.eye(3)
    assert torch.equal(ours, want) and blocks.grad is not None
