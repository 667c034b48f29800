"""LoKr against PEFT 0.21.2: PEFT's factorisation shape cases, outputs and adapter gradients in both
evaluation orders (the activation order never materialises the Kronecker product), dropout,
merge/unmerge, checkpoints both ways, errors, cost model (eager lowering throughout)."""

import copy

import peft
import pytest
import sympy
import torch
from torch import nn

import adapt_compiler as ac
from adapt_compiler.checkpoint import CheckpointError
from adapt_compiler.lowering.cost import TOKENS
from adapt_compiler.passes import METHODS
from adapt_compiler.passes.method import Layer
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import (adapter_grads_ours, adapter_grads_peft, assert_close, assert_peft_checkpoint_round_trip,
                    call_model, compare_grads, logits_of, ours_from_peft, peft_twin, randomize_)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVS = ["conv_in", "conv1", "conv2", "down", "proj"]  # 3×3 (incl. 3→8 and stride 2) and a 1×1
KEYS = ("lokr_",)


def _check(base, peft_cfg, spec, batch, orders=("activation", "weight"), loss_of=None):
    """Same random adapter in PEFT and in ours: outputs and adapter gradients equal, in every order."""
    pm = peft_twin(base, peft_cfg)
    randomize_(pm, KEYS)
    loss_of = loss_of or (lambda o: logits_of(o).square().mean())
    for order in orders:
        m = ours_from_peft(base, pm, spec.replace(order=order))
        pm.zero_grad()
        ours, theirs = call_model(m, batch), call_model(pm, batch)
        assert_close(logits_of(ours), logits_of(theirs), what=f"output ({order})")
        loss_of(ours).backward()
        loss_of(theirs).backward()
        compare_grads(m, pm)
        assert {d.order for d in m.decisions().values()} == {order}
    return m, pm


class MLP(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.up = nn.Linear(d_in, d_out)
        self.down = nn.Linear(d_out, 5)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


# (d_in, d_out, LoKr options, expected parameter shapes of `up`)
SHAPE_CASES = {
    "full_w1_full_w2": (16, 32, dict(r=4), {"lokr_w1": (4, 4), "lokr_w2": (8, 4)}),
    "low_rank_w2": (64, 96, dict(r=2), {"lokr_w1": (8, 8), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)}),
    "decompose_both": (64, 96, dict(r=2, decompose_both=True),
                       {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)}),
    "decompose_factor": (48, 60, dict(r=2, decompose_factor=4),
                         {"lokr_w1": (4, 4), "lokr_w2_a": (15, 2), "lokr_w2_b": (2, 12)}),
    "large_r_full_w2": (64, 96, dict(r=6, decompose_both=True), {"lokr_w1": (8, 8), "lokr_w2": (12, 8)}),
    "prime_dims": (13, 7, dict(r=2), {"lokr_w1": (1, 1), "lokr_w2_a": (7, 2), "lokr_w2_b": (2, 13)}),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_factorisation_shape_cases_match_peft(case):
    d_in, d_out, kw, shapes = SHAPE_CASES[case]
    torch.manual_seed(0)
    base = MLP(d_in, d_out).eval()
    x = torch.randn(2, 3, d_in)
    m, pm = _check(base, peft.LoKrConfig(alpha=3, target_modules=["up"], **kw),
                   ac.LoKr(alpha=3, targets=["up"], **kw), x)
    ours = {k.rsplit(".", 1)[-1]: tuple(v.shape) for k, v in m.adapter_state_dict().items()}
    theirs = {k.rsplit(".", 1)[-1]: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert ours == theirs == shapes


def test_llama_gqa_matches_peft_with_patterns():
    # k/v are 64→32 (grouped-query); per-layer rank and alpha; gate_proj 64→128
    targets = ATTN + ["gate_proj"]
    kw = dict(r=2, alpha=8, decompose_both=True, rank_pattern={"k_proj": 1}, alpha_pattern={"v_proj": 3})
    cfg = peft.LoKrConfig(target_modules=targets, **kw)
    _check(tiny_llama(), cfg, ac.LoKr(targets=targets, **kw), token_batch(labels=True),
           loss_of=lambda o: o.loss)


@pytest.mark.parametrize("variant", ["low_rank_w2", "cp_w2", "full_w2"])
def test_convnet_matches_peft(variant):
    # 8 channels -> (2, 4) × (2, 4); r=1 < 4/2 factors W2, r=4 keeps it full; conv_in has d_in 3 = 1·3
    kw = {"low_rank_w2": dict(r=1), "cp_w2": dict(r=1, use_effective_conv2d=True),
          "full_w2": dict(r=4, decompose_both=True)}[variant]
    cfg = peft.LoKrConfig(alpha=2, target_modules=CONVS, **kw)
    m, _ = _check(tiny_convnet(), cfg, ac.LoKr(alpha=2, targets=CONVS, **kw), image_batch())
    keys = set(m.adapter_state_dict())
    assert ("base_model.model.block1.conv1.lokr_t2" in keys) == (variant == "cp_w2")
    assert "base_model.model.proj.lokr_t2" not in keys  # PEFT: no CP form for 1×1


class GroupedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # grouped: materialised ΔW on the activation side
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_grouped_dilated_conv_matches_peft():
    torch.manual_seed(0)
    base = GroupedConvs().eval()
    cfg = peft.LoKrConfig(r=1, alpha=5, target_modules=["a", "b"], use_effective_conv2d=True)
    _check(base, cfg, ac.LoKr(r=1, alpha=5, targets=["a", "b"], use_effective_conv2d=True),
           image_batch(channels=4, size=9))


def _compare_grads_with_dropped_modules(m, pm):
    """PEFT skips a dropped module (no grad); we multiply it by 0 (zero grad)."""
    ours, theirs = adapter_grads_ours(m), adapter_grads_peft(pm)
    assert set(theirs) <= set(ours) and theirs
    for k, g in ours.items():
        assert_close(g, theirs[k] if k in theirs else torch.zeros_like(g), what=f"grad {k}")


@pytest.mark.parametrize("dropout", [dict(rank_dropout=0.3), dict(rank_dropout=0.3, rank_dropout_scale=True),
                                     dict(module_dropout=0.5)])
def test_train_dropout_matches_peft_rng(dropout):
    # with one kind of dropout our random draws are PEFT's (rand(1) [, rand(d_out)] per layer and call)
    base = tiny_llama(layers=1)
    pm = peft_twin(base, peft.LoKrConfig(r=2, alpha=8, target_modules=ATTN, **dropout))
    randomize_(pm, KEYS)
    m = ours_from_peft(base, pm, ac.LoKr(r=2, alpha=8, targets=ATTN, **dropout))
    m.train(), pm.train()
    batch = token_batch(labels=True)
    m(**batch)  # capture first (no random draws there)
    for seed in (1, 2):
        pm.zero_grad(), m.zero_grad()
        torch.manual_seed(seed)
        ours = m(**batch)
        torch.manual_seed(seed)
        theirs = pm(**batch)
        assert_close(ours.logits, theirs.logits, what=f"train output, seed {seed}")
        ours.loss.backward(), theirs.loss.backward()
        _compare_grads_with_dropped_modules(m, pm)


def test_both_dropouts_semantics_and_train_graph_exports():
    """Both dropouts on: RNG order differs from PEFT (it skips rand(d_out) for a dropped module), so
    check the semantics: the adapter output is 0 (module dropped) or rows are 0 or kept unscaled."""
    torch.manual_seed(0)
    base = MLP(16, 32).eval()
    spec = ac.LoKr(r=2, targets=["up"], init_weights=False, rank_dropout=0.5, module_dropout=0.5)
    m = ac.compile(base, spec, lowering="eager")
    x = torch.randn(3, 16)
    full = m(x)
    with m.disable_adapters():
        y0 = m(x)
    m.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        y = m(x).detach()
        if torch.equal(y, y0):
            seen.add("dropped")
        else:
            seen.add("kept")
    assert seen == {"dropped", "kept"}
    assert not torch.equal(full, y0)
    # row semantics on the layer itself (rank_dropout_scale=False: kept rows unscaled)
    slot = next(iter(m.slots.values()))
    meth, spec, p = slot.methods["default"], m.state.specs["default"], slot.params("default")
    w = base.up.weight
    whole = meth.delta(spec, slot.layer, p, x, w, training=False)
    for seed in range(6):
        torch.manual_seed(seed)
        d = meth.delta(spec.replace(module_dropout=0.0), slot.layer, p, x, w, training=True).detach()
        kept = d.abs().amax(0) > 0
        assert 0 < kept.sum() < 32
        assert_close(d, whole * kept, what="rank-dropout rows")
    ep = torch.export.export(m, (x,), strict=False)
    assert any("rand" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_identity_at_init(init):
    base = tiny_convnet()
    x = image_batch()
    want = base(x)
    for order in ("activation", "weight"):
        spec = ac.LoKr(r=1, targets=CONVS, use_effective_conv2d=True, init_weights=init, order=order)
        m = ac.compile(base, spec, lowering="eager")
        assert_close(m(x), want, rtol=1e-6, atol=1e-7, what=order)
    m = ac.compile(base, ac.LoKr(r=1, targets=CONVS, init_weights=False), lowering="eager")
    assert not torch.allclose(m(x), want)


def test_merge_unmerge_bit_exact():
    base = tiny_llama()
    pm = peft_twin(base, peft.LoKrConfig(r=2, alpha=8, target_modules=ATTN))
    randomize_(pm, KEYS)
    m = ours_from_peft(base, pm, ac.LoKr(r=2, alpha=8, targets=ATTN))
    batch = token_batch()
    before = {k: v.clone() for k, v in m.table.frozen.items()}
    out = m(**batch).logits
    m.merge()
    assert_close(m(**batch).logits, out, what="merged")
    assert_close(m.merged_module()(**batch).logits, out, what="merged_module")
    assert_close(pm.merge_and_unload()(**batch).logits, out, what="PEFT merged")
    m.unmerge()
    assert all(torch.equal(before[k], v) for k, v in m.table.frozen.items())
    assert torch.equal(m(**batch).logits, out)


@pytest.mark.parametrize("case", ["llama_patterns", "convnet_cp"])
def test_checkpoint_round_trips(case, tmp_path):
    if case == "llama_patterns":
        base, batch = tiny_llama(), token_batch()
        kw = dict(r=2, alpha=8, rank_pattern={"q_proj": 1}, alpha_pattern={"o_proj": 5}, decompose_both=True,
                  decompose_factor=4, rank_dropout=0.1, rank_dropout_scale=True, init_weights="lycoris")
        cfg, spec = peft.LoKrConfig(target_modules=ATTN, **kw), ac.LoKr(targets=ATTN, **kw)
    else:
        base, batch = tiny_convnet(), image_batch()
        cfg = peft.LoKrConfig(r=1, alpha=4, target_modules=CONVS, use_effective_conv2d=True)
        spec = ac.LoKr(r=1, alpha=4, targets=CONVS, use_effective_conv2d=True)
    assert_peft_checkpoint_round_trip(base, batch, cfg, spec, tmp_path, KEYS)


def test_errors_name_the_layer_and_change_nothing(tmp_path):
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterShapeError, match=r"model\.embed_tokens.*embedding"):
        ac.compile(base, ac.LoKr(targets=["embed_tokens", "q_proj"]))
    with pytest.raises(ac.AdapterShapeError, match=r"model\.layers\.1\.self_attn\.v_proj.*rank -2"):
        ac.compile(base, ac.LoKr(targets=["v_proj"], rank_pattern={"layers.1.self_attn.v_proj": -2}))
    for bad in (dict(r=0), dict(rank_dropout=1.0), dict(decompose_factor=0), dict(decompose_factor=2.5),
                dict(init_weights="gaussian"), dict(alpha=None)):
        with pytest.raises(ac.AdapterError):
            ac.LoKr(**bad)
    # a checkpoint made with another factorisation: refused with the key, nothing changed or added
    other = peft.LoKrConfig(r=2, target_modules=["q_proj"], decompose_factor=4)
    peft_twin(base, other).save_pretrained(tmp_path)
    m = ac.compile(base, ac.LoKr(r=2, targets=["q_proj"]), lowering="eager")
    params = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    with pytest.raises(CheckpointError, match=r"q_proj\.lokr_w\d(_[ab])?: checkpoint \(\d+, \d+\) vs model"):
        m.load_adapter_state_dict(peft.utils.load_peft_weights(str(tmp_path)), "default")
    m.load_adapter(str(tmp_path), "other")  # as its own adapter (its config says decompose_factor=4) it fits
    key = "base_model.model.model.layers.0.self_attn.q_proj.lokr_w1"
    assert m.adapter_state_dict("other")[key].shape == (4, 4)
    with pytest.raises(CheckpointError, match="missing keys"):
        m.load_adapter_state_dict({}, "default")
    assert all(torch.equal(params[k], v) for k, v in m.adapter_state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_cost_model_orders():
    lokr = METHODS["lokr"]
    layer = Layer("lin", "linear", (1024, 1024), False, torch.float32)
    c = lokr.cost(ac.LoKr(r=16), layer, TOKENS)
    at = lambda n: {k: float(sympy.sympify(v).subs(TOKENS, n)) for k, v in c.items()}  # noqa: E731
    # 1024 = 32·32: activation is T·b·c·(d + a) = 65k·T vs a 2M-FLOP fold; PEFT: fold + a full GEMM
    assert at(1)["activation"] < at(1)["weight"]
    assert at(2048)["activation"] < 2 * 2048 * 1024 * 1024 / 10
    conv = Layer("c", "conv2d", (64, 64, 3, 3), True, torch.float32, padding=(1, 1))
    cc = lokr.cost(ac.LoKr(r=2), conv, TOKENS)
    assert float(sympy.sympify(cc["activation"]).subs(TOKENS, 1)) < float(sympy.sympify(cc["weight"]))
    m = ac.compile(tiny_llama(), ac.LoKr(r=2, targets=ATTN), lowering="eager")
    m.train()
    m(**token_batch())
    rows = m.report().rows
    assert rows and all(r.method == "lokr" and r.order in ("activation", "weight") for r in rows)
