"""Hotswap without recompiling, and mixed-adapter batches (`adapter_names=`), against PEFT."""

import peft
import pytest
import torch
from peft import get_peft_model_state_dict
from torch._dynamo.testing import CompileCounter

import adapt_compiler as ac
from adapt_compiler.lowering import kernels
from adapt_compiler.passes.method import AdapterError
from models import tiny_llama, token_batch
from oracle import assert_close, peft_twin, randomize_

TARGETS = ["q_proj", "v_proj"]


def _saved_peft(base, path, seed, **cfg):
    pm = peft_twin(base, peft.LoraConfig(target_modules=TARGETS, **cfg))
    randomize_(pm, ("lora_",), seed=seed)
    pm.save_pretrained(path)
    return pm


# -- hotswap ---------------------------------------------------------------------------------------
def test_hotswap_replaces_weights_without_recompiling(tmp_path):
    base, batch = tiny_llama(layers=1), token_batch()
    first = _saved_peft(base, tmp_path / "a", seed=1, r=8, lora_alpha=16)
    second = _saved_peft(base, tmp_path / "b", seed=2, r=4, lora_alpha=32, use_rslora=True)  # smaller rank, new scale
    m = ac.compile(base, tmp_path / "a", lowering="eager", example_inputs=batch)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    assert_close(compiled(**batch).logits, first(**batch).logits, what="before hotswap")
    assert counter.frame_count == 1
    a_before = list(m.adapter_parameters())
    values_before = [p.detach().clone() for p in a_before]
    m.load_adapter(tmp_path / "b", "default", hotswap=True)
    a_after = list(m.adapter_parameters())
    assert len(a_after) == len(a_before) and all(p is q for p, q in zip(a_after, a_before)), "same tensor objects"
    assert not all(torch.equal(p, v) for p, v in zip(a_after, values_before)), "updated in place"
    assert_close(compiled(**batch).logits, second(**batch).logits, what="after hotswap")
    assert counter.frame_count == 1, "hotswap must not recompile"
    m.load_adapter(tmp_path / "a", "default", hotswap=True)  # and back
    assert_close(compiled(**batch).logits, first(**batch).logits, what="swapped back")
    assert counter.frame_count == 1


def test_hotswap_refuses_what_the_graph_bakes_in_before_touching_weights(tmp_path):
    base = tiny_llama(layers=1)
    _saved_peft(base, tmp_path / "a", seed=1, r=4, lora_alpha=8)
    _saved_peft(base, tmp_path / "dora", seed=2, r=4, lora_alpha=8, use_dora=True)
    _saved_peft(base, tmp_path / "big", seed=3, r=8, lora_alpha=8)
    m = ac.compile(base, tmp_path / "a", lowering="eager")
    before = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    with pytest.raises(AdapterError, match="use_dora"):
        m.load_adapter(tmp_path / "dora", "default", hotswap=True)
    with pytest.raises(AdapterError, match="shape"):
        m.load_adapter(tmp_path / "big", "default", hotswap=True)  # rank above the compiled one
    with pytest.raises(AdapterError, match="no adapter named"):
        m.load_adapter(tmp_path / "a", "other", hotswap=True)
    assert all(torch.equal(before[k], v) for k, v in m.adapter_state_dict().items())


# -- mixed batches ---------------------------------------------------------------------------------
NAMES = ["math", "__base__", "code", "math"]


@pytest.fixture(scope="module")
def two_adapters():
    base = tiny_llama(layers=2)
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="math")
    pm.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], use_rslora=True))
    randomize_(pm, ("lora_",))
    m = ac.compile(base, {"math": ac.LoRA(r=4, alpha=8, targets=TARGETS),
                          "code": ac.LoRA(r=2, alpha=4, targets=["v_proj", "o_proj"], rslora=True)}, lowering="eager")
    for name in ("math", "code"):
        m.load_adapter_state_dict(get_peft_model_state_dict(pm, adapter_name=name), name)
    return m, pm


def _own_adapter_rows(m, batch, names):
    """Each sample run with its own adapter (the whole batch, then that sample's row)."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with m.disable_adapters():
                rows.append(m(**batch).logits[i])
        else:
            m.set_adapter(name)
            rows.append(m(**batch).logits[i])
    m.set_adapter("math")
    return torch.stack(rows)


def test_mixed_batch_equals_own_adapter_per_sample_and_peft(two_adapters):
    m, pm = two_adapters
    batch = token_batch(batch=len(NAMES))
    ours = m(**batch, adapter_names=NAMES).logits
    assert_close(ours, _own_adapter_rows(m, batch, NAMES), what="per-sample adapters")
    assert_close(ours, pm(**batch, adapter_names=NAMES).logits, what="PEFT adapter_names")
    assert m.state.mixed is None, "the per-call names do not leak into later calls"


@pytest.mark.skipif(not (kernels.HAVE_TRITON and kernels.INTERPRET), reason="needs TRITON_INTERPRET=1")
def test_mixed_batch_through_the_sgmv_kernel(two_adapters):
    m, pm = two_adapters
    batch = token_batch(batch=len(NAMES))
    with kernels.interpret_kernels():
        ours = m(**batch, adapter_names=NAMES).logits
    assert_close(ours, pm(**batch, adapter_names=NAMES).logits)


def test_mixed_batch_with_a_non_lora_path(two_adapters):
    """DoRA is not stackable: the generic path evaluates each adapter and selects per sample."""
    m, _ = two_adapters
    m.add_adapter("dora", ac.LoRA(r=2, targets=["q_proj"], use_dora=True, init=False))
    try:
        names = ["dora", "math", "__base__", "dora"]
        batch = token_batch(batch=4)
        assert_close(m(**batch, adapter_names=names).logits, _own_adapter_rows(m, batch, names))
    finally:
        m.delete_adapter("dora")


def test_mixed_batch_in_a_compiled_graph_does_not_recompile_per_batch(two_adapters, monkeypatch):
    """The module's own lowering: the per-sample indices are a tensor input, not a guard."""
    m, pm = two_adapters
    counter = CompileCounter()
    monkeypatch.setattr(m, "lowering", counter)  # a torch.compile backend as the lowering
    m.invalidate_graphs()
    torch._dynamo.reset()
    batch = token_batch(batch=len(NAMES))
    try:
        m(**batch)  # the plain graph
        for names in (NAMES, ["code", "code", "math", "__base__"], ["__base__"] * 4):
            assert_close(m(**batch, adapter_names=names).logits, pm(**batch, adapter_names=names).logits)
        assert counter.frame_count == 2, "one graph for plain calls, one for mixed batches"
    finally:
        m.invalidate_graphs()


def test_adapter_names_are_validated(two_adapters):
    m, _ = two_adapters
    batch = token_batch(batch=2)
    with pytest.raises(AdapterError, match="unknown adapter"):
        m(**batch, adapter_names=["math", "nope"])
    with pytest.raises(AdapterError, match="one name per sample"):
        m(**batch, adapter_names=["math"])
    with pytest.raises(AdapterError, match="list"):
        m(**batch, adapter_names="math")
