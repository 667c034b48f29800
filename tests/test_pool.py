"""The serving pool: new adapters without recapturing or recompiling (lowering/pool.py)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch._dynamo.utils
from peft import PeftModel

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from adapt_compiler.errors import AdapterError
from models import tiny_llama, token_batch
from oracle import assert_close, peft_twin, randomize_

TARGETS = ["q_proj", "k_proj", "v_proj"]
# ranks 2..8, several alphas, rsLoRA, and subsets of the pool's targets
KINDS = [dict(r=r, lora_alpha=a, target_modules=t, use_rslora=rs)
         for r, a, t, rs in [(2, 4, TARGETS, False), (4, 8, ["q_proj", "v_proj"], False), (8, 16, TARGETS, True),
                             (3, 5, ["k_proj"], False), (6, 6, ["v_proj"], True)]]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Ten PEFT adapter directories with non-trivial weights (the 100 loads cycle through them)."""
    base = tiny_llama(layers=1)
    root = tmp_path_factory.mktemp("pool")
    dirs = []
    for i in range(10):
        pm = peft_twin(base, peft.LoraConfig(**KINDS[i % len(KINDS)]))
        randomize_(pm, ("lora_",), seed=i, scale=0.3)
        pm.save_pretrained(root / f"d{i}")
        dirs.append(root / f"d{i}")
    return base, dirs


def _peft_with(base, named_dirs: dict):
    """PEFT with these adapters loaded (the oracle for a mixed batch)."""
    items = list(named_dirs.items())
    pm = PeftModel.from_pretrained(copy.deepcopy(base), items[0][1], adapter_name=items[0][0]).eval()
    for name, path in items[1:]:
        pm.load_adapter(path, adapter_name=name)
    return pm


@pytest.fixture(scope="module")
def served(adapter_dirs):
    """A compiled (Inductor) module with a pool of 16 slots, LRU eviction."""
    base, dirs = adapter_dirs
    m = ac.compile(base, dirs[2], adapter_name="first", max_adapters=16, max_rank=8, evict=True)
    return m, base, dirs


def test_100_adapters_loaded_while_a_mixed_batch_of_8_is_served_without_recompiling(served):
    m, base, dirs = served
    batch = token_batch(batch=8, seq=6)
    live: dict = {"first": dirs[2]}
    m(**batch, adapter_names=["first"] * 8)  # warm-up: the one capture and compile
    before = COUNTERS["captures"], torch._dynamo.utils.counters["stats"]["unique_graphs"]
    evictions = COUNTERS["pool_evictions"]
    for i in range(100):
        name = f"adapter_{i}"
        m.load_adapter(dirs[i % len(dirs)], name)
        live[name] = dirs[i % len(dirs)]
        recent = [f"adapter_{j}" for j in range(max(0, i - 6), i + 1)]
        names = (recent + ["__base__"] * 8)[:8]
        out = m(**batch, adapter_names=names).logits
        if i % 33 == 0 or i == 99:  # the batch equals PEFT's with the same eight adapters
            pm = _peft_with(base, {n: live[n] for n in dict.fromkeys(n for n in names if n != "__base__")})
            assert_close(out, pm(**batch, adapter_names=names).logits, what=f"after {i + 1} loads")
    assert (COUNTERS["captures"], torch._dynamo.utils.counters["stats"]["unique_graphs"]) == before
    assert COUNTERS["pool_evictions"] - evictions == 101 - 16  # 101 adapters through 16 slots, LRU
    assert len(m.pool.names) == 16 and "adapter_99" in m.pool and "first" not in m.pool
    with pytest.raises(AdapterError, match="'first' is no longer in the pool"):
        m(**batch)  # the active adapter was evicted: an error, not the base model's outputs
    m.set_adapter("adapter_99")


def test_memory_per_adapter(served):
    m, *_ = served
    d, r = 64, 8  # hidden 64, q/k/v of a 1-layer Llama with 4 heads, 2 kv heads of 16
    outs = {"q_proj": 64, "k_proj": 32, "v_proj": 32}
    want = sum((r * d + o * r) * 4 + 4 for o in outs.values())
    assert m.pool.bytes_per_adapter() == want
    total = sum(b.numel() * b.element_size() for b in m.pool.buffers())
    assert total == 16 * want


def test_single_adapter_calls_and_delete_free_a_slot(served):
    m, base, dirs = served
    batch = token_batch(batch=2)
    before = COUNTERS["captures"]
    m.load_adapter(dirs[1], "solo")
    previous = m.active_adapters[0]
    m.set_adapter("solo")
    try:
        ours = m(**batch).logits
    finally:
        m.set_adapter(previous)
    assert_close(ours, PeftModel.from_pretrained(copy.deepcopy(base), dirs[1]).eval()(**batch).logits)
    evictions = COUNTERS["pool_evictions"]
    m.delete_adapter("solo")
    m.load_adapter(dirs[0], "next")  # takes the freed slot: nothing evicted
    assert COUNTERS["pool_evictions"] == evictions and "solo" not in m.pool
    assert COUNTERS["captures"] == before


def test_a_pool_adapter_saves_as_peft(served, tmp_path):
    m, base, dirs = served
    m.load_adapter(dirs[3], "to_save")
    m.save_adapter(tmp_path / "saved", "to_save")
    batch = token_batch(batch=2)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved").eval()(**batch).logits
    assert_close(ours, PeftModel.from_pretrained(copy.deepcopy(base), dirs[3]).eval()(**batch).logits)


def test_what_does_not_fit_a_slot_is_refused_before_anything_changes(adapter_dirs, tmp_path):
    base, dirs = adapter_dirs
    m = ac.compile(base, ac.LoRA(r=4, targets=["q_proj", "v_proj"]), lowering="eager", max_adapters=2)
    state = lambda: (m.pool.names, [b.lora_A.clone() for b in m.pool.banks.values()])  # noqa: E731
    before = state()
    with pytest.raises(AdapterError, match="rank 8 .* above the pool's max_rank=4"):
        m.add_adapter("big", ac.LoRA(r=8, targets=["q_proj"]))
    with pytest.raises(AdapterError, match="not among the pool's target layers"):
        m.load_adapter(dirs[3], "k_only")  # targets k_proj
    m.load_adapter(dirs[1], "fits")
    with pytest.raises(AdapterError, match="pool is full .* evict=True"):
        m.add_adapter("third", ac.LoRA(r=2, targets=["q_proj"]))
    after = state()
    assert after[0] == ["default", "fits"] and before[0] == ["default"]
    # a non-low-rank adapter is a regular adapter (graphs built for it), not a pool slot
    m.add_adapter("dora", ac.LoRA(r=2, targets=["q_proj"], use_dora=True))
    assert "dora" in m.state.specs and "dora" not in m.pool


def test_generate_with_pool_adapters_equals_peft(adapter_dirs):
    base, dirs = adapter_dirs
    m = ac.compile(base, dirs[2], adapter_name="one", lowering="eager", max_adapters=4, max_rank=8)
    m.load_adapter(dirs[1], "two")
    pm = _peft_with(base, {"one": dirs[2], "two": dirs[1]})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 5), generator=g)
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, cache_implementation="static", pad_token_id=0)
    names = ["two", "__base__", "one"]
    assert torch.equal(m.generate(input_ids=ids, adapter_names=names, **kw),
                       pm.generate(input_ids=ids, adapter_names=names, **kw))
