"""lowering="regional" (lowering/regional.py): each distinct repeated block compiled once.

Oracle: the eager lowering of the same adapted module (itself checked against PEFT elsewhere), with
non-trivial adapter weights. Every compiled fixture here is module-scoped; the module takes about
2-3 minutes on the shared 2-core machine (slow).
"""

from __future__ import annotations

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from tests.models import tiny_llama, token_batch

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj"]
# (batch, seq, left padding of row 0): sizes 1 included, none equal to the first call's
SHAPES = [(1, 1, 0), (1, 9, 0), (4, 3, 1), (3, 17, 5)]


def _pair(layers: int, spec, lowering: str = "regional"):
    """(compiled, eager) AdaptedModules over one base model with the same non-zero adapter weights."""
    model = tiny_llama(layers=layers)
    fast = ac.compile(model, spec, lowering=lowering)
    ref = ac.compile(model, spec, lowering="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fast.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.load_adapter_state_dict(fast.adapter_state_dict())
    fast.train()
    ref.train()
    return fast, ref


def _batch(b, s, pad, seed=0):
    batch = token_batch(b, s, labels=True, seed=seed)
    if pad:
        batch["attention_mask"][0, :pad] = 0
    return batch


def _step(m, batch):
    """(loss, {name: grad}) of one training step."""
    for p in m.adapter_parameters():
        p.grad = None
    out = m(**batch)
    # one token predicts nothing (the causal LM loss is NaN): train on the logits then
    loss = out.loss if batch["input_ids"].shape[1] > 1 else out.logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_adapter_parameters()}


def _assert_same_step(fast, ref, batch):
    loss_f, grads_f = _step(fast, batch)
    loss_r, grads_r = _step(ref, batch)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() and grads_f
    for name in grads_r:
        assert grads_r[name].abs().max() > 0, name  # the comparison means something
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def uniform():
    """3 identical decoder layers; the first training step has run (compiles counted around it)."""
    fast, ref = _pair(3, ac.LoRA(r=4, targets=TARGETS))
    before = COUNTERS["regional_compiles"]
    _assert_same_step(fast, ref, _batch(2, 7, 0))
    return fast, ref, COUNTERS["regional_compiles"] - before


def _graph_and_meta(m):
    gm = m.latest_graph()
    return gm, gm.meta["ac_regions"]


def test_first_step_matches_eager_and_the_guard_checked_it(uniform):
    fast, _, _ = uniform
    (what, verdict), = fast.report().checks
    assert verdict.status == "passed" and verdict.lowering == "regional", (what, verdict)


def test_repeated_blocks_form_one_group_compiled_once(uniform):
    fast, _, compiles = uniform
    gm, meta = _graph_and_meta(fast)
    assert meta["whole"] is None
    assert meta["groups"] == {0: ["model.layers.0", "model.layers.1", "model.layers.2"]}
    # one compile for the group, plus the glue before and after the blocks (embedding/mask, head/loss)
    assert compiles == 1 + 2
    # the decision is on the adapted graph's nodes, adapter slots included
    slot_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("ac_slots.")]
    assert slot_nodes and all(n.meta["ac_region"].startswith("group 0: model.layers.") for n in slot_nodes)
    assert "regional: group 0 compiled once for 3 block(s)" in str(fast.report())


@pytest.mark.parametrize("b,s,pad", SHAPES)
def test_new_batch_and_sequence_sizes_neither_recompile_nor_recapture(uniform, b, s, pad):
    fast, ref, _ = uniform
    compiles, captures = COUNTERS["regional_compiles"], COUNTERS["captures"]
    _assert_same_step(fast, ref, _batch(b, s, pad, seed=b * 100 + s))
    assert COUNTERS["regional_compiles"] == compiles
    assert COUNTERS["captures"] - captures <= 1  # the eager reference module may capture; ours must not
    assert len(fast._graphs) == 1 and len(next(iter(fast._graphs.values()))) == 1


def test_eval_no_grad_matches_eager(uniform):
    fast, ref, _ = uniform
    fast.eval()
    ref.eval()
    try:
        batch = _batch(2, 5, 1, seed=9)
        with torch.no_grad():
            torch.testing.assert_close(fast(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)
    finally:
        fast.train()
        ref.train()


def test_layers_that_differ_form_their_own_groups():
    """layers_to_transform leaves layer 3 without an adapter; rank_pattern gives layer 2 another
    rank: three groups, layers 0 and 1 share one."""
    spec = ac.LoRA(r=4, targets=TARGETS, layers_to_transform=[0, 1, 2], rank_pattern={"layers.2.self_attn.q_proj": 2})
    fast, ref = _pair(4, spec)
    _assert_same_step(fast, ref, _batch(2, 6, 1))
    _, meta = _graph_and_meta(fast)
    groups = sorted(meta["groups"].values())
    assert groups == [["model.layers.0", "model.layers.1"], ["model.layers.2"], ["model.layers.3"]], groups
    _assert_same_step(fast, ref, _batch(1, 1, 0, seed=5))


def test_gradient_checkpointing_compiles_whole_and_trains_right():
    """Checkpointed blocks are not partitioned (report() says why); the whole graph trains like eager."""
    model = tiny_llama(layers=2)
    model.gradient_checkpointing_enable()
    spec = ac.LoRA(r=4, targets=TARGETS)
    fast, ref = ac.compile(model, spec, lowering="regional"), ac.compile(model, spec, lowering="eager")
    with torch.no_grad():
        for p in fast.adapter_parameters():
            p.normal_(0, 0.1)
    ref.load_adapter_state_dict(fast.adapter_state_dict())
    fast.train()
    ref.train()
    _assert_same_step(fast, ref, _batch(2, 7, 1))
    _, meta = _graph_and_meta(fast)
    assert "gradient-checkpointed" in meta["whole"], meta
    assert any("gradient-checkpointed" in line for line in fast.report().regions)
