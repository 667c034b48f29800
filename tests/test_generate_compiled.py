"""The compiled decode step: Inductor graphs for prefill and decode, no recapture or recompile per token.

One module-scoped compiled module (Inductor, the correctness guard on) serves every test here; the
first generate call compiles the prefill and the decode graph once.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch._dynamo.utils
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from models import tiny_llama
from oracle import assert_close, ours_from_peft, peft_twin, randomize_
from test_generate import ATTN, prompts

STATIC = dict(do_sample=False, use_cache=True, cache_implementation="static", pad_token_id=0)


def _saved(base, path, seed):
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    randomize_(pm, ("lora_",), seed=seed, scale=0.4)
    pm.save_pretrained(path)
    return pm


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    base = tiny_llama(layers=1)
    root = tmp_path_factory.mktemp("adapters")
    first, second = _saved(base, root / "a", 1), _saved(base, root / "b", 2)
    m = ours_from_peft(base, first, ac.LoRA(r=4, alpha=8, targets=ATTN), lowering="inductor")
    m.generate(**prompts(), max_new_tokens=2, **STATIC)  # warm-up: captures and compiles prefill + decode
    return m, first, second, root


def _entries(m, phase):
    """The graph entries of one generation phase ("prefill" / "decode"), from the structure keys."""
    return [e for key, es in m._graphs.items() for e in es if ("kv_cache", ("StaticCache", "static", phase)) in
            (key[-1][2] if len(key[-1]) == 3 else ())]  # key: (root, training, signature)


def _compiled_code_entries(entry) -> int:
    """How many compiled versions Dynamo holds for this graph (a recompile adds one). A static decode
    graph is compiled over its lifted tensors (lowering/lifted.py): one program per adapter state."""
    step = _adapted(entry.lowered)
    served = step.fn.fn  # what the correctness guard serves after the first call
    programs = getattr(served, "programs", None)
    compiled = [getattr(fn, "compiled", fn) for fn, _ in programs.values()] if programs is not None else []
    codes = [fn._orig_mod.forward.__code__ for fn in compiled] or [step.gm.forward.__code__]
    return sum(len(_debug_get_cache_entry_list(code)) for code in codes)


def _adapted(by_key: dict):
    """The "adapted" variant's value in an entry's graphs/lowered (keyed (variant, recompute key))."""
    (value,) = [v for (variant, _), v in by_key.items() if variant == "adapted"]
    return value


def _counts():
    return COUNTERS["captures"], torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_prefill_and_decode_are_separate_compiled_graphs(compiled):
    m, *_ = compiled
    prefill, decode = _entries(m, "prefill"), _entries(m, "decode")
    assert len(prefill) == 1 and len(decode) == 1
    assert prefill[0] is not decode[0]
    assert _compiled_code_entries(decode[0]) == 1
    # the guard checked both graphs' first calls against the eager graph
    verdicts = [_adapted(e.graphs).meta["ac_guard"] for e in (*prefill, *decode)]
    assert all(v is not None and v.status == "passed" and v.lowering == "inductor" for v in verdicts)


def test_64_tokens_run_one_decode_graph_without_recompiling(compiled):
    m, first, *_ = compiled
    inputs = prompts()
    before = _counts()
    ours = m.generate(**inputs, max_new_tokens=64, **STATIC)
    assert _counts() == before, "no capture and no Dynamo compile over 64 tokens"
    assert _compiled_code_entries(_entries(m, "decode")[0]) == 1
    assert torch.equal(ours, first.generate(**inputs, max_new_tokens=64, **STATIC))


def test_a_new_prompt_length_does_not_recompile_decode(compiled):
    m, first, *_ = compiled
    decode = _entries(m, "decode")[0]
    captures = COUNTERS["captures"]
    for length in (9, 4):
        inputs = prompts(length=length, seed=length)
        ours = m.generate(**inputs, max_new_tokens=5, **STATIC)
        assert torch.equal(ours, first.generate(**inputs, max_new_tokens=5, **STATIC))
    assert COUNTERS["captures"] == captures, "the prefill graph takes any prompt length"
    assert _entries(m, "decode") == [decode] and _compiled_code_entries(decode) == 1


def test_hotswap_between_generate_calls_does_not_recompile(compiled):
    m, first, second, root = compiled
    inputs = prompts()
    before = _counts()
    m.load_adapter(root / "b", "default", hotswap=True)
    try:
        ours = m.generate(**inputs, max_new_tokens=6, **STATIC)
        assert torch.equal(ours, second.generate(**inputs, max_new_tokens=6, **STATIC))
    finally:
        m.load_adapter(root / "a", "default", hotswap=True)
    assert torch.equal(m.generate(**inputs, max_new_tokens=6, **STATIC),
                       first.generate(**inputs, max_new_tokens=6, **STATIC))
    assert _counts() == before


def test_the_static_cache_object_is_kept_across_decode_steps(compiled):
    """The decode graph updates the cache in place and hands the same object back (no rebuilt copy)."""
    m, *_ = compiled
    from transformers import StaticCache

    cache = StaticCache(config=m.config, max_cache_len=256)
    seen = []
    driver = m._ac_driver
    original = type(driver)._update_model_kwargs_for_generation

    def spy(self, outputs, *args, **kwargs):
        seen.append(outputs.cache)
        return original(self, outputs, *args, **kwargs)

    type(driver)._update_model_kwargs_for_generation = spy  # our own driver class, not the user's model
    try:
        m.generate(**prompts(), max_new_tokens=4, cache=cache, **{k: v for k, v in STATIC.items()
                                                                  if k != "cache_implementation"})
    finally:
        type(driver)._update_model_kwargs_for_generation = original
    assert len(seen) == 4 and all(c is cache for c in seen)


def test_one_row_decode_computes_linear_layers_as_reductions_with_peft_tokens(compiled):
    """Batch 1: the decode step's linear layers see one row; Inductor computes them as fused reductions
    (lowering/gemv.py), the decision is on the graph, and the tokens are still PEFT's. The 2-row
    decode graph of the other tests gets our few-row reduction (FewRowProducts), also on the graph."""
    from adapt_compiler.lowering.gemv import GEMV

    m, first, *_ = compiled
    two = prompts()  # 2 rows (compiled already when the tests before this one ran)
    assert torch.equal(m.generate(**two, max_new_tokens=4, **STATIC), first.generate(**two, max_new_tokens=4, **STATIC))
    inputs = prompts(rows=1, length=7, seed=3)
    decompositions = torch._dynamo.utils.counters["inductor"]["decompose_mm"]
    ours = m.generate(**inputs, max_new_tokens=12, **STATIC)
    assert torch.equal(ours, first.generate(**inputs, max_new_tokens=12, **STATIC))
    decode = _entries(m, "decode")
    one_row = [e for e in decode if "see one row" in _adapted(e.graphs).meta.get(GEMV, "")]
    assert len(one_row) == 1, "the batch-1 decode graph records the decision"
    gm = _adapted(one_row[0].graphs)
    assert gm.meta[GEMV].startswith("8 of 8 linear layers see one row"), gm.meta[GEMV]  # q/k/v/o slots, MLP, head
    assert gm.meta["ac_guard"].status == "passed"
    # Inductor rewrote them: each adapted layer's base product and LoRA's two products, and the rest
    assert torch._dynamo.utils.counters["inductor"]["decompose_mm"] - decompositions >= 8
    assert "matrix-vector products as fused reductions" in str(m.report())
    two_rows = [_adapted(e.graphs) for e in decode if e is not one_row[0]]
    assert two_rows and all(g.meta[GEMV].startswith("8 of 8 linear layers see 2 rows") for g in two_rows), \
        [g.meta.get(GEMV) for g in two_rows]
    assert all(g.meta["ac_guard"].status == "passed" for g in two_rows)


def test_few_row_rewrite_equals_the_product_and_leaves_other_shapes_to_blas():
    """FewRowProducts on a compiled graph: 2..FEW_ROWS rows (with and without a bias) give x @ W.t() + b to
    float rounding, and 1 row, FEW_ROWS + 1 rows or a weight dim over the limit are not rewritten."""
    from adapt_compiler.lowering.gemv import FEW_ROWS, MAX_DIM, FewRowProducts

    def f(x, w, b):
        return torch.nn.functional.linear(torch.rms_norm(x, (x.shape[-1],)), w) + torch.addmm(b, x, w.t())

    g = torch.Generator().manual_seed(0)
    cases = [(2, 64, 48, True), (FEW_ROWS, 32, 40, True), (1, 32, 40, False), (FEW_ROWS + 1, 32, 40, False),
             (4, 32, MAX_DIM + 1, False)]
    for rows, inner, out, rewritten in cases:
        x, w, b = (torch.randn(rows, inner, generator=g), torch.randn(out, inner, generator=g),
                   torch.randn(out, generator=g))
        torch._dynamo.reset()
        before = COUNTERS["few_row_products"]
        got = torch.compile(f, dynamic=False, options={"post_grad_custom_post_pass": FewRowProducts(),
                                                           "fx_graph_cache": False})(x, w, b)  # the pass runs
        assert_close(got, f(x, w, b), rtol=1e-5, atol=1e-5, what=f"{rows} rows")
        assert (COUNTERS["few_row_products"] - before == 2) == rewritten, (rows, inner, out)


def test_set_adapter_between_generate_calls_runs_each_adapters_decode_program(compiled):
    """The decode graph is compiled over its tensors with the slots traced in (lowering/lifted.py):
    one program per adapter state. Switching adapters gives each adapter's PEFT tokens, and once both
    have run, switching back and forth compiles nothing."""
    from adapt_compiler.lowering.lifted import LIFTED

    m, first, second, root = compiled
    inputs = prompts()
    m.load_adapter(root / "b", "other")  # a new adapter rebuilds the graphs (as before lifting)
    expected = {"default": first.generate(**inputs, max_new_tokens=6, **STATIC),
                "other": second.generate(**inputs, max_new_tokens=6, **STATIC)}
    try:
        for name in ("other", "default"):
            m.set_adapter(name)
            assert torch.equal(m.generate(**inputs, max_new_tokens=6, **STATIC), expected[name])
        before = _counts()
        for name in ("other", "default"):
            m.set_adapter(name)
            assert torch.equal(m.generate(**inputs, max_new_tokens=6, **STATIC), expected[name])
        assert _counts() == before, "each adapter's prefill and decode programs were compiled already"
        decode = _entries(m, "decode")[0]
        assert _adapted(decode.graphs).meta[LIFTED].startswith("compiled over its tensors")
        assert len(_adapted(decode.lowered).fn.fn.programs) == 2
    finally:
        m.set_adapter("default")
        m.delete_adapter("other")


def test_a_compiled_mixed_decode_gives_each_row_its_adapters_tokens_and_reads_each_calls_names(compiled):
    """generate(adapter_names=...) with a static cache through the compiled prefill and decode graphs: every
    row gets its own adapter's PEFT tokens (or the base model's), and a new assignment of names to rows
    compiles nothing and is not served a previous call's assignment."""
    m, first, second, root = compiled
    inputs = prompts()  # 2 rows
    m.load_adapter(root / "b", "other")
    try:
        with first.disable_adapter():
            base = first.generate(**inputs, max_new_tokens=6, **STATIC)
        rows = {"default": first.generate(**inputs, max_new_tokens=6, **STATIC),
                "other": second.generate(**inputs, max_new_tokens=6, **STATIC), "__base__": base}
        before = None
        for names in (["default", "other"], ["other", "default"], ["__base__", "other"], ["other", "other"]):
            ours = m.generate(**inputs, adapter_names=names, max_new_tokens=6, **STATIC)
            for i, name in enumerate(names):
                assert torch.equal(ours[i], rows[name][i]), (names, i)
            before = before or _counts()  # after the first mixed call: its graphs are compiled
        assert _counts() == before, "new names per row: no capture, no compile"
        (mixed,) = [v for e in _entries(m, "decode") for (variant, _), v in e.graphs.items() if variant == "mixed"]
        assert mixed.meta["ac_guard"].status == "passed"
    finally:
        m.delete_adapter("other")
