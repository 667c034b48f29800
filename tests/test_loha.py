"""LoHa against PEFT 0.21.2: outputs and adapter gradients (both evaluation orders), dropout,
merge/unmerge, checkpoints both ways, errors, cost model (eager lowering throughout)."""

import copy

import peft
import peft.tuners.loha.layer as peft_loha
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
KEYS = ("hada_",)


def _autograd_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """PEFT's HadaWeightCP forward under plain autograd (its hand-written backward is wrong, see below)."""
    rebuild = lambda t, a, b: torch.einsum("ijkl,jr,ip->prkl", t, b, a)  # noqa: E731
    return rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b) * scale


@pytest.fixture
def correct_peft_cp(monkeypatch):
    monkeypatch.setattr(peft_loha, "make_weight_cp", _autograd_cp)


def _check(base, peft_cfg, spec, batch, orders=("activation", "weight"), loss_of=None, train=False):
    """Same random adapter in PEFT and in ours: outputs and adapter gradients equal, in every order."""
    pm = peft_twin(base, peft_cfg)
    randomize_(pm, KEYS)
    loss_of = loss_of or (lambda o: logits_of(o).square().mean())
    for order in orders:
        m = ours_from_peft(base, pm, spec.replace(order=order))
        pm.zero_grad()
        if train:
            m.train(), pm.train()
        ours, theirs = call_model(m, batch), call_model(pm, batch)
        assert_close(logits_of(ours), logits_of(theirs), what=f"output ({order})")
        loss_of(ours).backward()
        loss_of(theirs).backward()
        compare_grads(m, pm)
        assert {d.order for d in m.decisions().values()} == {order}
    return m, pm


def test_llama_gqa_matches_peft_with_patterns():
    # k/v are 64→32 (grouped-query); per-layer rank and alpha through the patterns
    targets = ATTN + ["gate_proj"]
    pat = dict(rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})
    cfg = peft.LoHaConfig(r=4, alpha=8, target_modules=targets, **pat)
    m, _ = _check(tiny_llama(), cfg, ac.LoHa(r=4, alpha=8, targets=targets, **pat), token_batch(labels=True),
                  loss_of=lambda o: o.loss)
    sd = m.adapter_state_dict()
    shapes = {k.split(".", 3)[-1]: tuple(v.shape) for k, v in sd.items() if "layers.0." in k}
    assert shapes["layers.0.self_attn.k_proj.hada_w1_a"] == (32, 2)
    assert shapes["layers.0.mlp.gate_proj.hada_w2_b"] == (4, 64)


@pytest.mark.parametrize("effective", [False, True])
def test_convnet_matches_peft(effective, correct_peft_cp):
    cfg = peft.LoHaConfig(r=4, alpha=6, target_modules=CONVS, use_effective_conv2d=effective)
    m, _ = _check(tiny_convnet(), cfg, ac.LoHa(r=4, alpha=6, targets=CONVS, use_effective_conv2d=effective),
                  image_batch())
    keys = set(m.adapter_state_dict())
    assert ("base_model.model.block1.conv1.hada_t1" in keys) == effective
    assert "base_model.model.proj.hada_t1" not in keys  # PEFT: no Tucker form for 1×1


class GroupedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("effective", [False, True])
def test_grouped_dilated_conv_matches_peft(effective, correct_peft_cp):
    torch.manual_seed(0)
    base = GroupedConvs().eval()
    cfg = peft.LoHaConfig(r=3, alpha=5, target_modules=["a", "b"], use_effective_conv2d=effective)
    _check(base, cfg, ac.LoHa(r=3, alpha=5, targets=["a", "b"], use_effective_conv2d=effective),
           image_batch(channels=4, size=9))


def test_peft_effective_conv_backward_is_wrong_ours_is_autograd():
    """Oracle pitfall: PEFT 0.21.2's HadaWeightCP.backward uses the other factor's Tucker core for
    dW1a/dW2a. Ours is plain autograd; the conv tests above compare against PEFT's forward under
    autograd. If this starts failing, PEFT fixed it: drop the `correct_peft_cp` fixture."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
          for s in [(3, 3, 3, 3), (3, 5), (3, 4), (3, 3, 3, 3), (3, 5), (3, 4)]]
    G = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    theirs = torch.autograd.grad((peft_loha.HadaWeightCP.apply(*ps, torch.tensor(1.0)) * G).sum(), ps)
    right = torch.autograd.grad((_autograd_cp(*ps, 1.0) * G).sum(), ps)
    assert not torch.allclose(theirs[1], right[1]) and torch.allclose(theirs[2], right[2])
    layer = Layer("c", "conv2d", (5, 4, 3, 3), False, torch.float64)
    spec = ac.LoHa(r=3, use_effective_conv2d=True)
    p = dict(zip(["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"], ps))
    dw = METHODS["loha"].delta_weight(spec, layer, p, G) / (spec.alpha / spec.r)  # unscaled
    ours = torch.autograd.grad((dw * G).sum(), ps)
    for a, b in zip(ours, right):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dropout", [dict(rank_dropout=0.3), dict(module_dropout=0.5)])
def test_train_dropout_matches_peft_rng(dropout):
    # with one kind of dropout our random draws are PEFT's (rand(1) [, rand(d_out)] per layer and call)
    base = tiny_llama(layers=1)
    pm = peft_twin(base, peft.LoHaConfig(r=4, alpha=8, target_modules=ATTN, **dropout))
    randomize_(pm, KEYS)
    m = ours_from_peft(base, pm, ac.LoHa(r=4, alpha=8, targets=ATTN, **dropout))
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
    m.eval(), pm.eval()
    assert_close(m(**batch).logits, pm(**batch).logits, what="eval: no dropout")


def _compare_grads_with_dropped_modules(m, pm):
    """PEFT skips a dropped module (no grad); we multiply it by 0 (zero grad)."""
    ours, theirs = adapter_grads_ours(m), adapter_grads_peft(pm)
    assert set(theirs) <= set(ours) and theirs
    for k, g in ours.items():
        assert_close(g, theirs[k] if k in theirs else torch.zeros_like(g), what=f"grad {k}")


class OneLinear(nn.Module):
    def __init__(self, d_in=16, d_out=32):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def test_both_dropouts_semantics_and_train_graph_exports():
    """Both dropouts on: RNG order differs from PEFT (it skips rand(d_out) for a dropped module), so
    check the semantics: the adapter output is 0 (module dropped) or its rows are 0 or ×1/mean(mask)."""
    torch.manual_seed(0)
    base = OneLinear().eval()
    spec = ac.LoHa(r=4, targets=["lin"], init_weights=False, rank_dropout=0.5, module_dropout=0.5)
    m = ac.compile(base, spec, lowering="eager")
    x = torch.randn(3, 16)
    with m.disable_adapters():
        y0 = m(x)
    full = m(x) - y0  # eval: the whole delta
    m.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        d = (m(x) - y0).detach()
        if d.abs().max() == 0:
            seen.add("dropped")
            continue
        kept = d.abs().amax(0) > 0  # (d_out,) rows kept
        assert_close(d, full * kept / kept.float().mean(), what="rank-dropout rescale")
        seen.add("kept")
    assert seen == {"dropped", "kept"}
    # the train graph traces: the module draw is a tensor op, not a Python branch
    ep = torch.export.export(m, (x,), strict=False)
    assert any("rand" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("effective", [False, True])
def test_identity_at_init(effective):
    base = tiny_convnet()
    x = image_batch()
    want = base(x)
    for order in ("activation", "weight"):
        m = ac.compile(base, ac.LoHa(r=4, targets=CONVS, use_effective_conv2d=effective, order=order),
                       lowering="eager")
        assert_close(m(x), want, rtol=1e-6, atol=1e-7, what=order)
    m = ac.compile(base, ac.LoHa(r=4, targets=CONVS, use_effective_conv2d=effective, init_weights=False),
                   lowering="eager")
    assert not torch.allclose(m(x), want)


def test_merge_unmerge_bit_exact():
    base = tiny_llama()
    pm = peft_twin(base, peft.LoHaConfig(r=4, alpha=8, target_modules=ATTN))
    randomize_(pm, KEYS)
    m = ours_from_peft(base, pm, ac.LoHa(r=4, alpha=8, targets=ATTN))
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


@pytest.mark.parametrize("case", ["llama_patterns", "convnet_effective"])
def test_checkpoint_round_trips(case, tmp_path, correct_peft_cp):
    if case == "llama_patterns":
        base, batch = tiny_llama(), token_batch()
        kw = dict(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 5}, rank_dropout=0.1)
        cfg, spec = peft.LoHaConfig(target_modules=ATTN, **kw), ac.LoHa(targets=ATTN, **kw)
    else:
        base, batch = tiny_convnet(), image_batch()
        cfg = peft.LoHaConfig(r=3, alpha=4, target_modules=CONVS, use_effective_conv2d=True)
        spec = ac.LoHa(r=3, alpha=4, targets=CONVS, use_effective_conv2d=True)
    assert_peft_checkpoint_round_trip(base, batch, cfg, spec, tmp_path, KEYS)


def test_errors_name_the_layer_and_change_nothing(tmp_path):
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterShapeError, match=r"model\.embed_tokens.*embedding"):
        ac.compile(base, ac.LoHa(targets=["embed_tokens", "q_proj"]))
    with pytest.raises(ac.AdapterShapeError, match=r"model\.layers\.0\.self_attn\.q_proj.*rank 0"):
        ac.compile(base, ac.LoHa(targets=["q_proj"], rank_pattern={"layers.0.self_attn.q_proj": 0}))
    bads = (dict(r=0), dict(rank_dropout=1.0), dict(module_dropout=-0.1), dict(alpha="8"),
            dict(init_weights="x"))
    for bad in bads:
        with pytest.raises(ac.AdapterError):
            ac.LoHa(**bad)
    # a checkpoint whose shapes do not fit: refused with the key, nothing added
    peft_twin(base, peft.LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    m = ac.compile(base, ac.LoHa(r=4, targets=["q_proj"]), lowering="eager")
    params = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    with pytest.raises(CheckpointError, match=r"q_proj\.hada_w\d_[ab]: checkpoint \(\d+, \d+\) vs model"):
        m.load_adapter_state_dict(
            {k: v for k, v in peft.utils.load_peft_weights(str(tmp_path)).items()}, "default")
    with pytest.raises(CheckpointError):
        m.load_adapter_state_dict({}, "default")
    assert all(torch.equal(params[k], v) for k, v in m.adapter_state_dict().items())
    ac_dir = ac.compile(base, str(tmp_path), lowering="eager")  # the same dir loads fine on its own
    assert ac_dir.state.specs["default"].r == 2
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_cost_model_orders():
    loha = METHODS["loha"]
    layer = Layer("lin", "linear", (1024, 1024), False, torch.float32)
    c = loha.cost(ac.LoHa(r=16), layer, TOKENS)
    at = lambda n: {k: float(sympy.sympify(v).subs(TOKENS, n)) for k, v in c.items()}  # noqa: E731
    assert at(1)["activation"] < at(1)["weight"]  # decoding: rank-r² Khatri-Rao form
    assert at(2048)["weight"] < at(2048)["activation"]  # long sequences: one GEMM with W + ΔW
    # PEFT's way (build ΔW + a second full GEMM) costs more than either at any T ≥ 1
    peft_cost = at(2048)["weight"] + 2 * 2048 * 1024 * 1024
    assert min(at(2048).values()) < peft_cost / 10
    m = ac.compile(tiny_llama(), ac.LoHa(r=4, targets=ATTN), lowering="eager")
    m(**token_batch())
    rows = m.report().rows
    assert rows and all(r.method == "loha" and r.order in ("activation", "weight") for r in rows)
