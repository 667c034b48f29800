"""Any keyword argument the model accepts works, and is captured once (capture.py, hf_model.py).

* keywords that land in the model's `**kwargs` (HF's `num_items_in_batch`, `output_hidden_states`,
  `return_dict`) are captured (torch.export alone fails on them);
* a new keyword, or a new value of a Python scalar the graph depends on, is one new capture; a
  repeated call is none;
* `num_items_in_batch` given as a Python int is passed as a 0-dim tensor, so its value, which
  changes every Trainer step, never triggers a capture;
* an int the model branches on (`logits_to_keep`: a count as an int, an index tensor otherwise) is
  keyed by value: making it symbolic would make Llama select one position instead of keeping the
  last k (torch.export traces the SymInt down the tensor branch), a silently wrong graph.
"""

from __future__ import annotations

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from models import tiny_convnet, tiny_llama, token_batch
from oracle import assert_close, peft_pair

pytestmark = pytest.mark.real_capture  # these tests are about capture itself: no capture memo (conftest.py)

SPEC = ac.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def pair():
    import peft

    pm, m = peft_pair(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), SPEC,
                      keys=("lora_",))
    return pm.eval(), m.eval()


def _captures(fn):
    before = COUNTERS["captures"]
    out = fn()
    return out, COUNTERS["captures"] - before


def test_keywords_into_model_kwargs(pair):
    pm, m = pair
    batch = token_batch(labels=True)  # left padding on the last row
    with torch.no_grad():
        out, n = _captures(lambda: m(**batch, output_hidden_states=True))
        again, n2 = _captures(lambda: m(**batch, output_hidden_states=True))
        theirs = pm(**batch, output_hidden_states=True)
    assert (n, n2) == (1, 0), "a new keyword is captured once"
    assert len(out.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(out.hidden_states, theirs.hidden_states):
        assert_close(a, b, what="hidden state")
    assert_close(out.logits, theirs.logits)
    assert_close(again.loss, theirs.loss, what="loss")


def test_return_dict_false_gives_the_tuple(pair):
    pm, m = pair
    batch = token_batch(labels=True)
    with torch.no_grad():
        ours, theirs = m(**batch, return_dict=False), pm(**batch, return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_num_items_in_batch_any_value_one_capture(pair):
    """Trainer passes it as a tensor; users and older Trainers as an int: no capture per value."""
    pm, m = pair
    batch = token_batch(labels=True)
    with torch.no_grad():
        _, first = _captures(lambda: m(**batch, num_items_in_batch=10))
        for n in (10, 7, torch.tensor(25), 3):
            ours, more = _captures(lambda: m(**batch, num_items_in_batch=n))
            assert more == 0, f"num_items_in_batch={n} captured again"
            assert_close(ours.loss, pm(**batch, num_items_in_batch=n).loss, what=f"loss / {n}")
    assert first <= 1


def test_an_int_the_graph_depends_on_is_keyed_by_value(pair):
    pm, m = pair
    batch = token_batch()
    with torch.no_grad():
        for k in (1, 3, 1):
            ours = m(**batch, logits_to_keep=k).logits
            theirs = pm(**batch, logits_to_keep=k).logits
            assert ours.shape == theirs.shape == (2, k, 128)
            assert_close(ours, theirs, what=f"logits_to_keep={k}")
        _, n = _captures(lambda: m(**batch, logits_to_keep=3))
    assert n == 0


def test_padding_patterns_share_one_capture(pair):
    pm, m = pair
    with torch.no_grad():
        m(**token_batch(batch=3, seq=9))
        for seed, pad in ((2, 2), (3, 5)):
            batch = token_batch(batch=3, seq=9, seed=seed)
            batch["attention_mask"][0, :pad] = 0
            ours, n = _captures(lambda: m(**batch))
            assert n == 0
            assert_close(ours.logits, pm(**batch).logits, what=f"left padding {pad}")


def test_an_input_the_model_does_not_take_is_named():
    m = ac.compile(tiny_convnet(), ac.LoRA(r=2, targets=["conv1"]), lowering="eager")
    with pytest.raises(ac.AdapterError, match="pixel_mask"):
        m(torch.randn(1, 3, 16, 16), pixel_mask=torch.ones(1))
