"""The pipeline: decisions live on each graph's nodes, method hooks (shared tensors), the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import adapt_compiler as ac
from adapt_compiler.errors import AdapterError
from adapt_compiler.lowering.plan import PLAN, slot_nodes
from adapt_compiler.passes import register, unregister
from adapt_compiler.passes.method import WeightMethod, matmul_flops
from adapt_compiler.spec import AdapterSpec
from models import tiny_llama, token_batch


def _orders(gm):
    return {node.kwargs["orders"]["default"] for node, _ in slot_nodes(gm)}


def test_two_captures_of_one_mode_keep_their_own_orders_and_never_recompile():
    """Eval at 2×512 tokens folds ΔW (weight order); a second input structure at 2×4 tokens keeps
    the activation side. Each graph carries its own choice on its nodes: calling them in turn
    neither switches the other's order nor makes Dynamo recompile (its guards would fail if a
    choice lived in shared state, as it did in AdapterSlot.orders_by_mode)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    m = ac.compile(tiny_llama(layers=1, hidden=256), ac.LoRA(r=8, targets=["q_proj", "v_proj"]),
                   lowering=counter).eval()
    long = token_batch(batch=2, seq=512)
    short = {"input_ids": token_batch(batch=2, seq=4)["input_ids"]}  # another structure: no attention_mask
    with torch.no_grad():
        m(**long)
        m(**short)
        g_long, g_short = m.graph((), long), m.graph((), short)
        assert g_long is not g_short
        assert _orders(g_long) == {"weight"} and _orders(g_short) == {"activation"}
        compiled = counter.frame_count
        assert compiled == 2
        for _ in range(2):
            m(**long)
            m(**short)
    assert counter.frame_count == compiled, "a graph recompiled after the other one was captured"
    assert _orders(g_long) == {"weight"} and _orders(g_short) == {"activation"}
    decided = {d.order for node, _ in slot_nodes(g_long) for d in node.meta[PLAN].values()}
    assert decided == {"weight"}, "the cost figures on the node agree with the order it obeys"


def test_the_plan_is_visible_in_the_graph():
    m = ac.compile(tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj"]), lowering="eager")
    m.train()
    gm = m.graph((), token_batch())
    (node, _), = slot_nodes(gm)
    assert node.kwargs["training"] is True and node.kwargs["mixed"] is None
    assert set(node.kwargs["orders"]) == {"default"}
    assert "orders = {'default': " in gm.code, "the decision is an argument of the generated call"
    mixed = m.graph((), token_batch(), variant="mixed")
    (node, _), = slot_nodes(mixed)
    assert node.kwargs["mixed"] == "multi_lora"


# -- a toy method whose tensors are shared across layers (VeRA-like), registered by this test ----
@dataclasses.dataclass
class Shared(AdapterSpec):
    method = "toy_shared"
    r: int = 4


class SharedMethod(WeightMethod):
    """y = base(x) + λ_b ⊙ (B[:d_out] (λ_d ⊙ (A[:, :d_in] x))): A, B are frozen and shared by every
    layer (one random pair per adapter, sized for the largest layer); λ_d, λ_b are per layer."""

    name = "toy_shared"
    peft_type = "TOY_SHARED"
    prefix = "toy_"
    spec_type = Shared
    buffer_names = frozenset({"toy_A", "toy_B"})

    def init_shared(self, spec, layers):
        g = torch.Generator().manual_seed(0)
        d_in = max(layer.in_features for layer in layers)
        d_out = max(layer.out_features for layer in layers)
        return {"toy_A": torch.randn(spec.r, d_in, generator=g), "toy_B": torch.randn(d_out, spec.r, generator=g)}

    def init_params(self, spec, layer, weight):
        return {"toy_lambda_d": torch.ones(spec.r), "toy_lambda_b": torch.zeros(layer.out_features)}

    def _factors(self, layer, p):
        a = p["toy_A"][:, : layer.in_features] * p["toy_lambda_d"][:, None]
        return a, p["toy_B"][: layer.out_features] * p["toy_lambda_b"][:, None]

    def delta(self, spec, layer, p, x, weight, training):
        a, b = self._factors(layer, p)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def delta_weight(self, spec, layer, p, weight):
        a, b = self._factors(layer, p)
        return b @ a

    def cost(self, spec, layer, tokens):
        d_in, d_out = layer.in_features, layer.out_features
        return {"activation": matmul_flops(tokens, d_in, spec.r) + matmul_flops(tokens, spec.r, d_out),
                "weight": matmul_flops(d_out, spec.r, d_in)}

    def shared_peft_key(self, name):
        return f"base_model.{name}"

    def to_peft_config(self, spec):
        return {"r": spec.r}

    def from_peft_config(self, config):
        return Shared(r=config["r"])


@pytest.fixture
def toy_method():
    register(SharedMethod())
    try:
        yield
    finally:
        unregister("toy_shared")


def test_tensors_shared_across_layers(toy_method, tmp_path):
    base = tiny_llama(layers=2)
    m = ac.compile(base, Shared(r=4, targets=["q_proj", "o_proj"]), lowering="eager")
    shared = m.shared["default"]
    assert set(dict(shared.named_buffers())) == {"toy_A", "toy_B"}  # frozen, created once
    slots = m.slots_of("default")
    assert len(slots) == 4 and all(s.params("default")["toy_A"] is shared.toy_A for s in slots)
    batch = token_batch(labels=True)
    assert torch.equal(m(**batch).logits, base(**batch).logits), "identity at init (λ_b = 0)"
    with torch.no_grad():
        for s in slots:
            s.adapters["default"].toy_lambda_b.normal_()
    m.train()
    m(**batch).loss.backward()
    assert all(s.adapters["default"].toy_lambda_b.grad.abs().sum() > 0 for s in slots)
    m.eval()
    with torch.no_grad():
        unmerged = m(**batch).logits
        m.merge()
        merged = m(**batch).logits
        m.unmerge()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    m.save_adapter(tmp_path)
    again = ac.compile(base, str(tmp_path), lowering="eager")
    assert torch.equal(again.shared["default"].toy_A, shared.toy_A)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, unmerged)


@pytest.mark.parametrize("broken, match", [
    (dict(name="not an identifier"), "identifier"),
    (dict(prefix=""), "prefix"),
    (dict(peft_type="LORA"), "already served"),
    (dict(spec_type=int), "AdapterSpec dataclass"),
])
def test_the_registry_validates_methods(broken, match):
    method = type("Broken", (SharedMethod,), broken)()
    with pytest.raises(AdapterError, match=match):
        register(method)
    assert "toy_shared" not in ac.METHODS
