"""Gradient checkpointing in the adapted graph (lowering/recompute.py) and ac.compile(memory_budget=...).

torch.export inlines HF's checkpointing, so without this pass a model's flag changes nothing. The
tests are structural (the graph calls torch.utils.checkpoint per decoder layer; each adapter slot
runs twice per step, once more in the backward; the bytes saved for backward drop) and numerical
(the same loss and adapter gradients as without checkpointing, and as PEFT with HF checkpointing).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.lowering.recompute import recomputed_blocks
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import assert_close, compare_grads, ours_from_peft, peft_twin, randomize_

LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2"]
SPEC = ac.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])


def _model():
    # layer activations dominate the step here (small vocab, long sequence), as in real models
    return tiny_llama(layers=3, vocab=32)


@pytest.fixture(scope="module")
def shared():
    """One compiled module (one training capture) for the tests that only switch settings; each
    test puts the settings back."""
    m = ac.compile(_model(), SPEC, lowering="eager").train()
    randomize_(m, ("lora_",))
    return m


def _batch():
    return token_batch(batch=2, seq=64, vocab=32, labels=True)


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def _step(m, batch):
    """(loss, bytes saved for backward, adapter grads, slot forward calls) of one training step."""
    calls = [0]
    hooks = [s.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for s in m.slots.values()]
    out, saved = _saved_bytes(lambda: m(**batch))
    out.loss.backward()
    for h in hooks:
        h.remove()
    grads = [p.grad.detach().clone() for p in m.adapter_parameters()]
    m.zero_grad(set_to_none=True)
    return out.loss.detach(), saved, grads, calls[0]


def test_checkpointing_recomputes_each_layer_and_halves_saved_activations(shared):
    m, base = shared, shared.table.model
    plain = _step(m, _batch())
    assert recomputed_blocks(m.latest_graph()) == []
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing and not getattr(base.model.layers[0], "gradient_checkpointing", False)
    ckpt = _step(m, _batch())
    gm = m.latest_graph()
    assert recomputed_blocks(gm) == LAYERS
    calls = [n for n in gm.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == len(LAYERS) and all(n.kwargs["use_reentrant"] is False for n in calls)
    assert ckpt[3] == 2 * plain[3] == 2 * len(m.slots)  # every slot runs again in the backward
    assert ckpt[1] <= 0.5 * plain[1], f"saved for backward: {ckpt[1]} vs {plain[1]} bytes without checkpointing"
    assert torch.equal(ckpt[0], plain[0])
    for a, b in zip(ckpt[2], plain[2]):
        assert_close(a, b, what="adapter grad with checkpointing")
    m.gradient_checkpointing_disable()  # off again: the graph built before serves (cache key)
    assert recomputed_blocks(m.graph((), _batch())) == []


def _shape(node):
    v = node.meta.get("val")
    return tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else d for d in v.shape) if isinstance(v, torch.Tensor) else None


def test_blocks_rebuild_the_attention_mask_instead_of_keeping_it(shared):
    """The 4-D attention mask ([batch, 1, seq, seq], built once before the layers) is not a
    checkpointed block's input, which its recompute would keep: each block rebuilds it from the
    [batch, seq] padding mask (lowering/recompute.py `_replayed_inputs`). The padded batch makes the
    mask matter: the loss and grads equal the unchecked step's in the test above."""
    m = shared
    m.gradient_checkpointing_enable()
    try:
        gm = m.graph((), _batch())
    finally:
        m.gradient_checkpointing_disable()
    square = (2, 1, 64, 64)  # batch 2, seq 64
    calls = [n for n in gm.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert len(calls) == len(LAYERS)
    for call in calls:
        assert square not in [_shape(a) for a in call.args[1:]], f"{call.meta['ac_recompute']} keeps the 4-D mask"
        block = getattr(gm, call.args[0].target)
        assert square in [_shape(n) for n in block.graph.nodes], "the block does not rebuild the mask"
    assert square not in [_shape(n) for n in gm.graph.nodes if n.op == "call_function"], "the mask is still built outside"


def test_models_own_flag_is_honoured_and_every_n_layers():
    """HF's flag set on the model before ac.compile (the usual PEFT recipe), and every_n_layers."""
    base = _model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = ac.compile(base, SPEC, lowering="eager").train()
    assert m.is_gradient_checkpointing
    assert recomputed_blocks(m.graph((), _batch())) == LAYERS
    m.activation_checkpointing_enable(every_n_layers=2)
    assert recomputed_blocks(m.graph((), _batch())) == ["model.layers.0", "model.layers.2"]
    m.activation_checkpointing_enable(every_n_layers=3)
    assert recomputed_blocks(m.graph((), _batch())) == ["model.layers.0"]
    m.activation_checkpointing_disable()  # overrides the model's flag; the model keeps it
    assert recomputed_blocks(m.graph((), _batch())) == [] and base.model.layers[0].gradient_checkpointing


def test_matches_peft_with_hf_checkpointing():
    base = _model()
    pm = peft_twin(base, __import__("peft").LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_(pm, ("lora_",))
    pm.train()
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = ours_from_peft(base, pm, SPEC).train()
    m.gradient_checkpointing_enable()
    theirs, ours = pm(**_batch()), m(**_batch())
    assert_close(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    compare_grads(m, pm)


def test_eval_graphs_are_not_checkpointed():
    m = ac.compile(_model(), SPEC, lowering="eager")
    m.gradient_checkpointing_enable()
    m.eval()
    assert recomputed_blocks(m.graph((), _batch())) == []


def test_memory_budget_checkpoints_that_share_of_blocks_in_eager(shared):
    rc = shared.table.recompute
    try:
        for budget, count in ((1.0, 0), (0.7, 1), (0.34, 2), (0.1, 3)):
            rc.memory_budget = budget
            assert len(recomputed_blocks(shared.graph((), _batch()))) == count, budget
    finally:
        rc.memory_budget = None
    assert ac.compile(_model(), SPEC, lowering="eager", memory_budget=0.5).table.recompute.memory_budget == 0.5


def test_memory_budget_goes_to_aot_autograd_under_inductor(monkeypatch):
    """Inductor gets the budget as AOTAutograd's activation_memory_budget while it compiles (and
    no blocks are outlined: AOTAutograd's partitioner decides what to recompute)."""
    from torch._functorch import config as functorch_config

    from adapt_compiler import lowering

    seen = []
    wrapped = lowering._with_memory_budget(lambda: seen.append(functorch_config.activation_memory_budget), 0.25)
    wrapped()
    assert seen == [0.25] and functorch_config.activation_memory_budget == 1.0
    budgets = []

    def record(gm, how, options=None, memory_budget=None):
        budgets.append((how, memory_budget))
        return gm  # run it eagerly here; test_memory_budget.py compiles it and measures the effect

    monkeypatch.setattr(lowering, "lower", record)
    m = ac.compile(_model(), SPEC, memory_budget=0.25).train()
    m(**_batch()).loss.backward()
    assert budgets == [("inductor", 0.25)]
    assert recomputed_blocks(m.latest_graph()) == []


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "half", True])
def test_memory_budget_must_be_a_fraction(bad):
    with pytest.raises(ac.AdapterError, match="memory_budget"):
        ac.compile(_model(), SPEC, memory_budget=bad)


def test_checkpoint_options_are_honoured_or_refused_by_name(shared):
    m = shared
    m.gradient_checkpointing_enable({"use_reentrant": True, "preserve_rng_state": False})
    call = next(n for n in m.graph((), _batch()).graph.nodes if n.target is torch.utils.checkpoint.checkpoint)
    assert call.kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    m.gradient_checkpointing_disable()
    with pytest.raises(ac.AdapterError, match="context_fn"):
        m.gradient_checkpointing_enable({"context_fn": None})
    with pytest.raises(ac.AdapterError, match="offload"):
        m.activation_checkpointing_enable(offload=True)
    with pytest.raises(ac.AdapterError, match="every_n_layers"):
        m.activation_checkpointing_enable(every_n_layers=0)


def test_a_model_without_repeated_blocks_warns_naming_its_class():
    m = ac.compile(tiny_convnet(), ac.LoRA(r=2, targets=["conv1"]), lowering="eager").train()
    m.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(image_batch()).sum().backward()
    assert any("TinyConvNet" in str(w.message) and "checkpointing" in str(w.message) for w in caught)


def test_dropout_masks_repeat_in_the_recompute():
    """LoRA dropout inside a checkpointed block: the recompute draws the same mask (RNG state kept),
    so gradients equal the non-checkpointed step's under the same seed."""
    spec = ac.LoRA(r=4, alpha=8, dropout=0.3, targets=["q_proj", "v_proj"])
    m = ac.compile(_model(), spec, lowering="eager").train()
    randomize_(m, ("lora_",))
    torch.manual_seed(3)
    la, _, ga, _ = _step(m, _batch())
    m.gradient_checkpointing_enable()
    torch.manual_seed(3)
    lb, _, gb, _ = _step(m, _batch())
    assert recomputed_blocks(m.latest_graph()) == LAYERS
    assert torch.equal(la, lb)
    for x, y in zip(ga, gb):
        assert_close(x, y, what="grad with dropout")
