"""The default lowering is dynamic from its first compile (lowering/dynamic.py): a training run whose
batch sizes and sequence lengths vary never captures again and compiles one graph for every size
>= 2; a batch of one compiles exactly one more graph, specialised to it on purpose.

Counted with Dynamo's own counters (graphs compiled) and ours (captures). Oracle: the eager lowering
of the same adapted module (itself checked against PEFT elsewhere), non-trivial adapter weights,
at every shape. Two Inductor compiles of a 2-layer Llama: about 1.5 minutes on 2 cores (slow).
"""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters as dynamo_counters

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from tests.test_regional import _assert_same_step, _batch, _pair

pytestmark = pytest.mark.slow

# (batch, seq, left padding of row 0): every size >= 2, none equal to the first call's (2, 8)
SIZES_FROM_TWO = [(3, 17, 5), (8, 300, 0), (2, 3, 0), (5, 129, 40), (7, 33, 0), (4, 64, 3)]


def _train_batch(b, s, pad):
    """A Trainer-style batch: a new token count (a Python int) with every step."""
    batch = _batch(b, s, pad, seed=b * s)
    batch["num_items_in_batch"] = int(batch["attention_mask"].sum()) + b
    return batch


def _graphs() -> int:
    return dynamo_counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def pair():
    """(default lowering, eager) over one 2-layer Llama with the same non-zero adapter weights."""
    return _pair(2, ac.LoRA(r=4, targets=["q_proj", "v_proj"]), lowering="inductor")


def test_sizes_from_two_share_the_first_compile(pair):
    fast, ref = pair
    graphs, captures = _graphs(), COUNTERS["captures"]
    _assert_same_step(fast, ref, _train_batch(2, 8, 0))
    (what, verdict), = fast.report().checks
    assert verdict.status == "passed" and verdict.lowering == "inductor", (what, verdict)  # really compiled
    assert _graphs() == graphs + 1
    first_captures = COUNTERS["captures"]
    for b, s, pad in SIZES_FROM_TWO:
        _assert_same_step(fast, ref, _train_batch(b, s, pad))
    assert _graphs() == graphs + 1, "a new batch size or length compiled again"
    # each lowering captured once (the eager reference too); nothing new after the first step
    assert COUNTERS["captures"] == first_captures and first_captures - captures <= 2


def test_a_batch_of_one_compiles_one_specialised_graph(pair):
    fast, ref = pair
    _assert_same_step(fast, ref, _train_batch(2, 8, 0))  # the dynamic graph exists (fixture order-independent)
    graphs, captures = _graphs(), COUNTERS["captures"]
    for s in (9, 40, 3, 111):
        _assert_same_step(fast, ref, _train_batch(1, s, 0))
    assert _graphs() == graphs + 1
    (what, verdict), = fast.report().checks
    assert verdict.status == "passed" and verdict.shape_classes == 2, (what, verdict)  # the size-1 graph checked too
    for b, s, pad in SIZES_FROM_TWO[:2]:  # back to larger batches: the first graph still serves them
        _assert_same_step(fast, ref, _train_batch(b, s, pad))
    assert _graphs() == graphs + 1
    assert COUNTERS["captures"] == captures
