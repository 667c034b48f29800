"""Layer types beyond Linear / Conv2d / Embedding, wherever PEFT 0.21.2 supports them for one of our
methods (issue 20): Conv1d and Conv3d (LoRA, DoRA; LoHa and LoKr on Conv1d), nn.MultiheadAttention
(LoRA), nn.Embedding for OFT, and DoRA on a grouped conv. Each case checks the whole contract against
PEFT (tests/oracle.py `check_full_parity`): outputs and gradients, a training step, both checkpoint
directions, and merge where PEFT merges.

Two PEFT bugs are patched out of the oracle, and the patched and unpatched forms are compared below:
LoHa's Conv1d/Conv2d CP backward (hand-written, wrong; see test_loha.py) and LoKr's Conv1d with a full
W2 factor, where PEFT's `torch.kron` of a 2-D and a 3-D tensor scrambles ΔW. We compute ΔW = W1 ⊗ W2
correctly there; a PEFT checkpoint of that one configuration means something else in PEFT.
"""

import peft
import peft.tuners.loha.layer as peft_loha
import peft.tuners.lokr.layer as peft_lokr
import pytest
import torch
from torch import nn

import adapt_compiler as ac
from models import tiny_llama, token_batch
from oracle import assert_close, check_full_parity


class Conv1dNet(nn.Module):
    """Audio-like: a Conv1d, a grouped Conv1d, a pointwise Conv1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv1d(8, 8, 1)

    def forward(self, x):  # (N, 4, L)
        return self.pw(torch.relu(self.grouped(torch.relu(self.c1(x)))))


class Conv3dNet(nn.Module):
    """Video-like: a (1, 3, 3) Conv3d and a strided pointwise Conv3d."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.pw = nn.Conv3d(4, 4, 1, stride=(1, 2, 2))

    def forward(self, x):  # (N, 2, T, H, W)
        return self.pw(torch.relu(self.c3(x)))


class GroupedConv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 8, 1, groups=4)

    def forward(self, x):
        return self.pw(torch.relu(self.conv(x)))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.mha(x, x, x)
        return self.head(y)


def _net(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _inputs(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _correct_peft_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """PEFT's LoHa CP forward under plain autograd (its hand-written backward is wrong)."""
    rebuild = lambda t, a, b: torch.einsum("ijkl,jr,ip->prkl", t, b, a)  # noqa: E731
    return rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b) * scale


_peft_kron = peft_lokr.make_kron


def _correct_peft_kron(w1, w2, scale=1.0):
    """PEFT's make_kron with W1 lifted to W2's rank (PEFT lifts it for 4-D W2 only)."""
    if w2.dim() == 3:
        return torch.kron(w1.unsqueeze(-1).contiguous(), w2.contiguous()) * scale
    return _peft_kron(w1, w2, scale)


@pytest.fixture
def correct_peft(monkeypatch):
    monkeypatch.setattr(peft_loha, "make_weight_cp", _correct_peft_cp)
    monkeypatch.setattr(peft_lokr, "make_kron", _correct_peft_kron)


LORA_CONV1D = ["c1", "grouped", "pw"]
CASES = {
    # name: (model, inputs, PEFT config, our spec, key prefixes, merge, PEFT's merge works)
    "lora_conv1d": (Conv1dNet, (2, 4, 10), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "pw"]),
                    ac.LoRA(r=4, alpha=8, targets=["c1", "pw"]), ("lora_",), True, True),
    "lora_conv1d_grouped": (Conv1dNet, (2, 4, 10), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_CONV1D),
                            ac.LoRA(r=4, alpha=8, targets=LORA_CONV1D), ("lora_",), False, False),
    "dora_conv1d": (Conv1dNet, (2, 4, 10), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "pw"], use_dora=True),
                    ac.LoRA(r=4, alpha=8, targets=["c1", "pw"], use_dora=True), ("lora_",), True, True),
    # PEFT's merge of a 1×1×1 Conv3d squeezes the factors to 3-D and fails: ours is checked on its own
    "lora_conv3d": (Conv3dNet, (2, 2, 3, 6, 6), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c3", "pw"]),
                    ac.LoRA(r=4, alpha=8, targets=["c3", "pw"]), ("lora_",), True, False),
    "dora_conv3d": (Conv3dNet, (2, 2, 3, 6, 6),
                    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c3"], use_dora=True, lora_dropout=0.0),
                    ac.LoRA(r=2, alpha=4, targets=["c3"], use_dora=True), ("lora_",), True, True),
    "loha_conv1d": (Conv1dNet, (2, 4, 10), peft.LoHaConfig(r=2, alpha=4, target_modules=LORA_CONV1D),
                    ac.LoHa(r=2, alpha=4, targets=LORA_CONV1D), ("hada_",), True, True),
    "loha_conv1d_effective": (Conv1dNet, (2, 4, 10),
                              peft.LoHaConfig(r=2, alpha=4, target_modules=LORA_CONV1D, use_effective_conv2d=True),
                              ac.LoHa(r=2, alpha=4, targets=LORA_CONV1D, use_effective_conv2d=True), ("hada_",), True, True),
    "lokr_conv1d_full_w2": (Conv1dNet, (2, 4, 10), peft.LoKrConfig(r=2, alpha=4, target_modules=LORA_CONV1D),
                            ac.LoKr(r=2, alpha=4, targets=LORA_CONV1D), ("lokr_",), True, True),
    "lokr_conv1d_low_rank": (Conv1dNet, (2, 4, 10),
                             peft.LoKrConfig(r=1, alpha=4, target_modules=["c1"], decompose_factor=2),
                             ac.LoKr(r=1, alpha=4, targets=["c1"], decompose_factor=2), ("lokr_",), True, True),
    # regression (issue 20): DoRA on a grouped Conv2d crashed in ac.compile with a raw RuntimeError
    "dora_grouped_conv2d": (GroupedConv2dNet, (2, 8, 6, 6),
                            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "pw"], use_dora=True),
                            ac.LoRA(r=4, alpha=8, targets=["conv", "pw"], use_dora=True), ("lora_",), False, False),
    "lora_multihead_attention": (AttentionNet, (2, 5, 16),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha"], lora_dropout=0.3),
                                 ac.LoRA(r=2, alpha=4, targets=["mha"], dropout=0.3), ("lora_",), True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_type_matches_peft(case, correct_peft, tmp_path):
    cls, shape, cfg, spec, keys, merge, peft_merge = CASES[case]
    m = check_full_parity(_net(cls), _inputs(*shape), cfg, spec, tmp_path, keys=keys, merge=merge,
                          peft_merge=peft_merge)
    assert {s.layer.kind for s in m.slots.values()} <= {"linear", "conv1d", "conv2d", "conv3d"}
    if not merge:  # PEFT cannot merge into a grouped conv; nor can we, and we say so
        with pytest.raises(ac.AdapterError, match="groups"):
            m.merge()


def test_oft_on_embedding_matches_peft(tmp_path):
    targets = ["embed_tokens", "q_proj"]
    cfg = peft.OFTConfig(target_modules=targets, oft_block_size=8)
    m = check_full_parity(tiny_llama(layers=1), token_batch(), cfg, ac.OFT(targets=targets, oft_block_size=8),
                          tmp_path, keys=("oft_",))
    assert "base_model.model.model.embed_tokens.oft_embedding_R.weight" in m.adapter_state_dict()


def test_multihead_attention_counts_out_proj_twice_like_peft():
    """PEFT 0.21.2 merges MultiheadAttention's out_proj delta twice per call (and in merge_and_unload):
    a checkpoint means W_o + 2·s·B·A there. We keep that meaning; this pins it down."""
    base = _net(AttentionNet)
    x = _inputs(2, 5, 16)
    m = ac.compile(base, ac.LoRA(r=2, alpha=4, targets=["mha"], init=False), lowering="eager")
    sd = m.adapter_state_dict()
    a, b = sd["base_model.model.mha.base_layer.out_proj.lora_A.weight"], sd["base_model.model.mha.base_layer.out_proj.lora_B.weight"]
    ai, bi = sd["base_model.model.mha.lora_A.weight"], sd["base_model.model.mha.lora_B.weight"]
    import copy

    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.mha.in_proj_weight += 2.0 * bi @ ai
        ref.mha.out_proj.weight += 2 * 2.0 * b @ a
    assert_close(m(x), ref(x))


def test_peft_bugs_patched_in_the_oracle_are_real():
    """If these start failing, PEFT fixed them: drop the `correct_peft` fixture."""
    w1, w2 = torch.randn(2, 3), torch.randn(4, 5, 3)
    assert _peft_kron(w1, w2).shape == (4, 10, 9)  # PEFT: kron of 2-D and 3-D is not W1 ⊗ W2
    assert _correct_peft_kron(w1, w2).shape == (8, 15, 3)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
          for s in [(2, 2, 3, 1), (2, 4), (2, 3), (2, 2, 3, 1), (2, 4), (2, 3)]]
    theirs = torch.autograd.grad(peft_loha.HadaWeightCP.apply(*ps, torch.tensor(1.0)).sum(), ps)
    right = torch.autograd.grad(_correct_peft_cp(*ps, 1.0).sum(), ps)
    assert not all(torch.allclose(t, r) for t, r in zip(theirs, right))


def test_lokr_conv1d_effective_is_its_dense_delta():
    """PEFT 0.21.2 crashes on LoKr Conv1d with use_effective_conv2d (torch.kron of its CP factor);
    ours runs, and equals the dense ΔW it merges into, in both evaluation orders."""
    base, x = _net(Conv1dNet), _inputs(2, 4, 10)
    spec = ac.LoKr(r=1, alpha=4, targets=["c1"], use_effective_conv2d=True, init_weights=False)
    outs = {}
    for order in ("activation", "weight"):
        torch.manual_seed(0)
        m = ac.compile(base, spec.replace(order=order), lowering="eager")
        outs[order] = m(x)
    assert "base_model.model.c1.lokr_t2" in m.adapter_state_dict()
    assert_close(outs["activation"], outs["weight"])
    m.merge()
    assert_close(m(x), outs["weight"])


def test_lora_dilated_conv_is_refused_by_name():
    """PEFT's lora_A conv drops the base dilation, so its output would not line up (PEFT fails)."""
    base = nn.Sequential(nn.Conv1d(4, 4, 3, padding=2, dilation=2))
    with pytest.raises(ac.AdapterError, match="dilation"):
        ac.compile(base, ac.LoRA(r=2, targets=["0"]))
