"""Half-precision products on a CPU without native bf16 (lowering/half_gemm.py).

Where this CPU has native bf16 (oneDNN serves every layout), the tests force the rewrite on by
patching `slow_half_gemm`: what they check is the rewrite, which must then give PEFT's numbers.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import fx
from torch._inductor.utils import fresh_cache

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from adapt_compiler.lowering import guard, half_gemm
from adapt_compiler.lowering.guard import CompilerMismatchWarning
from models import tiny_llama, token_batch
from oracle import assert_close, compare_grads, randomize_

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
BF16 = dict(rtol=2e-2, atol=1e-2)  # docs/GUARANTEES.md, bfloat16


@pytest.fixture
def slow_cpu(monkeypatch):
    monkeypatch.setattr(half_gemm, "slow_half_gemm", lambda dtype: dtype in half_gemm.HALF)


def test_the_rewrite_follows_the_cpus_onednn_support():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert half_gemm.slow_half_gemm(torch.bfloat16) is (not native)
    assert half_gemm.slow_half_gemm(torch.float32) is False


def test_column_major_operand_pass_keeps_the_values(slow_cpu):
    """dy @ W in a compiled backward, both operands row-major: the pass copies dy column-major, and the
    input gradient equals eager's up to bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 64, dtype=torch.bfloat16)

    def loss(x):
        return torch.nn.functional.linear(x, w).float().square().sum()

    expected, = torch.autograd.grad(loss(x), x)
    before = COUNTERS["column_major_operands"]
    compiled = torch.compile(loss, options={"post_grad_custom_post_pass": half_gemm.ColumnMajorOperand()})
    with fresh_cache():  # a cache hit would not run the pass
        got, = torch.autograd.grad(compiled(x), x)
    assert COUNTERS["column_major_operands"] - before == 1, "the backward's dy @ W, and nothing else"
    assert_close(got, expected, what="input gradient", **BF16)


def test_a_row_major_pair_reads_its_smaller_operand_column_major(slow_cpu):
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    a.meta["val"] = torch.empty(8, 512, dtype=torch.bfloat16)
    b.meta["val"] = torch.empty(512, 64, dtype=torch.bfloat16)
    product = graph.call_function(torch.ops.aten.mm.default, (a, b))
    graph.output(product)
    half_gemm.ColumnMajorOperand()(graph)
    left, right = product.args
    assert right is b and left.target is torch.ops.aten.permute.default, "a (8x512) is the smaller one"
    assert left.args[0].target is torch.ops.aten.clone.default and left.args[0].args[0].args[0] is a


def test_float32_and_column_major_products_are_left_alone(slow_cpu):
    graph = fx.Graph()
    x, w, y, v = (graph.placeholder(n) for n in "xwyv")
    x.meta["val"], w.meta["val"] = torch.empty(8, 16), torch.empty(16, 4)  # float32
    y.meta["val"] = torch.empty(8, 16, dtype=torch.bfloat16)
    v.meta["val"] = torch.empty(4, 16, dtype=torch.bfloat16).t()  # column-major already
    graph.output((graph.call_function(torch.ops.aten.mm.default, (x, w)),
                  graph.call_function(torch.ops.aten.mm.default, (y, v))))
    before = len(graph.nodes)
    half_gemm.ColumnMajorOperand()(graph)
    assert len(graph.nodes) == before


def test_options_are_fingerprinted_without_an_address():
    """A saved verdict is matched on repr(options) (lowering/guard.py): the pass must repr the same in
    every process, or warm starts would never reuse one."""
    from adapt_compiler.lowering.gemv import FewRowProducts

    assert repr(half_gemm.ColumnMajorOperand(FewRowProducts())) == "ColumnMajorOperand(then=FewRowProducts())"


def test_bf16_training_with_the_rewrite_matches_peft(slow_cpu):
    """A bf16 Llama with float32 adapters (PEFT's default) trained through the compiled lowering with the
    rewrite on: the guard passes the compiled graph (its float32 adapter gradients are held to bf16's
    tolerance: they come from bf16 activations), logits and adapter gradients equal PEFT's (bf16
    tolerance), the report names the workaround, and the guard's eager reference ran its products
    column-major too."""
    base = tiny_llama(layers=1).to(torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN)).train()
    randomize_(pm, ("lora_",))
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=ATTN), lowering="inductor").train()
    for p in m.adapter_parameters():
        p.data = p.data.float()
    m.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    batch = token_batch()
    before = COUNTERS["column_major_operands"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)
        ours, theirs = m(**batch).logits, pm(**batch).logits
    assert COUNTERS["column_major_operands"] > before, "neither the compiled graph nor the reference rewrote"
    assert [c.status for _, c in m._checks()] == ["passed"]
    assert_close(ours, theirs, what="bf16 logits", **BF16)
    ours.float().square().mean().backward()
    theirs.float().square().mean().backward()
    compare_grads(m, pm, **BF16)
    assert any(half_gemm.WORKAROUND in line for line in m.report().workarounds)


def test_the_guard_holds_a_graph_to_its_coarsest_dtype():
    def graph_of(*dtypes):
        graph = fx.Graph()
        for i, dtype in enumerate(dtypes):
            graph.placeholder(f"x{i}").meta["val"] = torch.empty(2, 3, dtype=dtype)
        graph.output(None)
        return fx.GraphModule(torch.nn.Module(), graph)

    half, full = graph_of(torch.float32, torch.bfloat16), graph_of(torch.float32)
    assert guard.coarsest_tolerance(half) == guard.TOLERANCE[torch.bfloat16]
    assert guard.coarsest_tolerance(full) == guard.TOLERANCE[torch.float32]
    ref = torch.ones(4)
    off_by_1_percent = [("grad", ref * 1.01, ref)]
    assert guard._compare(off_by_1_percent)[1], "float32 alone: 1 % is a mismatch"
    assert not guard._compare(off_by_1_percent, guard.coarsest_tolerance(half))[1]
