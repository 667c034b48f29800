"""Llama-Adapter (ADAPTION_PROMPT) against PEFT: outputs, gradients, folding, checkpoints, errors."""

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapt_compiler as ac
from models import tiny_convnet, tiny_llama, tiny_mistral, token_batch
from oracle import assert_close, compare_grads, ours_from_peft, peft_twin, randomize_


def _pair(base, length=4, layers=2):
    pm = peft_twin(base, peft.AdaptionPromptConfig(adapter_len=length, adapter_layers=layers))
    randomize_(pm, ("adaption_gate",), seed=3, scale=0.7)  # non-zero gates: the branch matters
    return ours_from_peft(base, pm, ac.LlamaAdapter(adapter_len=length, adapter_layers=layers)), pm


@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=3), tiny_mistral], ids=["llama_gqa", "mistral"])
def test_matches_peft_eval_and_train(make):
    base = make()
    m, pm = _pair(base)
    batch = token_batch()  # left padding on the last row: the attention mask is in play
    theirs = pm(**batch).logits
    assert_close(m(**batch).logits, theirs, what="eval (prompt k/v computed)")
    with torch.no_grad():
        assert_close(m(**batch).logits, theirs, what="eval, no_grad (prompt k/v folded)")
    assert (theirs - base(**batch).logits).abs().max() > 1e-3, "the adapter branch must change the output"
    m.train()
    pm.train()
    ours, theirs = m(**batch).logits, pm(**batch).logits
    assert_close(ours, theirs, what="train")
    ours.square().mean().backward()
    theirs.square().mean().backward()
    compare_grads(m, pm)


def test_params_exist_at_compile_and_identity_at_init():
    base = tiny_llama(layers=3)
    m = ac.compile(base, ac.LlamaAdapter(adapter_len=5, adapter_layers=2), lowering="eager")
    names = [n for n, _ in m.named_adapter_parameters()]
    assert len(names) == 4 and all("layers__1" in n or "layers__2" in n for n in names), names
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)  # before the first call
    batch = token_batch()
    assert torch.equal(m(**batch).logits, base(**batch).logits)  # gate 0: exactly the base model
    m.train()
    m(**batch).logits.square().mean().backward()
    gates = [p for n, p in m.named_adapter_parameters() if n.endswith("adaption_gate")]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    opt.step()
    assert m.report().graph_adapters["default"][1] == 2 * (5 * 64 + 1)


def test_folded_inference_equals_unfolded_and_tracks_updates():
    base = tiny_llama()
    m, _ = _pair(base, layers=1)
    batch = token_batch()
    m.eval()
    with torch.no_grad():
        folded = m(**batch).logits
    block = next(iter(m.graph_adapters["default"].values()))
    assert block.folded_k.shape == (1, 4, 32)  # k_proj(P): 2 kv heads x 16
    assert_close(folded, m(**batch).logits, rtol=1e-6, what="folded vs unfolded")
    calls = []
    project = block.project
    block.project = lambda *a: calls.append(1) or project(*a)
    with torch.no_grad():
        m(**batch)
        m(**batch)
        assert not calls, "inference must read the folded K_P/V_P, not project the prompt per call"
        block.adaption_prompt.add_(0.5)  # an optimizer step, a checkpoint load: the fold must follow
        refolded = m(**batch).logits
        assert len(calls) == 1
    assert_close(refolded, m(**batch).logits, rtol=1e-6, what="re-folded after an update")
    assert (refolded - folded).abs().max() > 1e-4


def test_torch_compile_of_the_module_follows_a_prompt_update():
    """torch.compile(m) (Dynamo over our graph) re-folds the prompt after an update, as an eager call does:
    the fold runs outside Dynamo's graph on every call (traced in, it ran once and went stale)."""
    base = tiny_llama()
    m, _ = _pair(base, layers=1)
    batch = token_batch()
    m.eval()
    with torch.no_grad():
        m(**batch)  # the eager call that builds the graph torch.compile(m) inlines
        compiled = torch.compile(m, backend="eager")
        before = compiled(**batch).logits
        block = next(iter(m.graph_adapters["default"].values()))
        block.adaption_prompt.add_(0.5)  # an optimizer step, a checkpoint load
        after = compiled(**batch).logits
        assert (after - before).abs().max() > 1e-4
        assert_close(after, m(**batch).logits, rtol=1e-6, what="torch.compile(m) after a prompt update")


def test_checkpoints_round_trip_with_peft(tmp_path):
    base = tiny_llama(layers=3)
    m, pm = _pair(base)
    randomize_(pm, ("adaption_prompt",), seed=5, scale=1.0)
    batch = token_batch()
    want = pm(**batch).logits
    pm.save_pretrained(tmp_path / "peft")
    theirs_loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert_close(theirs_loaded(**batch).logits, want, what="PEFT dir -> ac.compile")
    theirs_loaded.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(layers=3), tmp_path / "ours")
    assert_close(back(**batch).logits, want, what="ours -> PeftModel.from_pretrained")


def test_clear_errors():
    with pytest.raises(ac.AdapterError, match="q/k/v/o"):
        ac.compile(tiny_convnet(), ac.LlamaAdapter(adapter_len=2, adapter_layers=1))
    with pytest.raises(ac.AdapterError, match="only 2 attention blocks"):
        ac.compile(tiny_llama(), ac.LlamaAdapter(adapter_len=2, adapter_layers=3))
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"  # matmul + softmax attention: no SDPA node to match
    m = ac.compile(eager, ac.LlamaAdapter(adapter_len=2, adapter_layers=1), lowering="eager")
    with pytest.raises(ac.AdapterError, match="scaled_dot_product_attention"):
        m(**token_batch())


class _Attn(nn.Module):
    """A Llama-like block from "another library": other names, GQA via enable_gqa, no RoPE."""

    def __init__(self, d=32, heads=4, kv=2):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.wq, self.wk = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.wv, self.wo = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=True)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1)), q


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Attn() for _ in range(2)])

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)[0]
        return x


def test_structural_match_on_a_non_hf_model():
    torch.manual_seed(0)
    net = _Net().eval()
    m = ac.compile(net, ac.LlamaAdapter(adapter_len=3, adapter_layers=1), lowering="eager")
    block = m.graph_adapters["default"]["blocks__1"]
    with torch.no_grad():
        block.adaption_gate.fill_(0.8)
    x = torch.randn(2, 5, 32)
    # PEFT's formula by hand on the top block: gate · softmax(Q K_Pᵀ/√hd) V_P, kv head i // 2, o_proj again
    h = x + net.blocks[0](x)[0]
    attn = net.blocks[1]
    out, q = attn(h)
    p = block.adaption_prompt
    kp = attn.wk(p).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, 0)
    vp = attn.wv(p).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, 0)
    probs = 0.8 * torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(8), -1)
    want = h + out + attn.wo((probs @ vp).transpose(1, 2).reshape(2, 5, 32))
    assert_close(m(x), want)
