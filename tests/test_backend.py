"""The torch.compile backend (PEFT models, ac.backend(dir, merge=...)) and torch.compile of an
AdaptedModule with fullgraph=True for every registered method.

Inductor compiles cost 10-20 s each on this CPU, so only two tests run Inductor; the rest use
Dynamo with a counting backend (the graph-break and recompile behaviour is Dynamo's alone).
"""

import copy
import importlib.metadata

import peft
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import adapt_compiler as ac
from adapt_compiler.lowering import backend as be
from adapt_compiler.passes import COUNTERS, METHODS
from adapt_compiler.passes.method import AdapterError, GraphMethod
from models import tiny_llama, token_batch
from oracle import assert_close, logits_of, peft_twin, randomize_

TARGETS = ["q_proj", "v_proj"]


def _peft_lora(base, dropout=0.0):
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout))
    randomize_(pm, ("lora_",))
    return pm


def _dynamo_graph(model, batch, rewrite):
    """The FX graph Dynamo hands a backend after `rewrite(gm, example_inputs)` (run inside the backend,
    while Dynamo's placeholder metadata is still there), its example inputs, and rewrite's result."""
    seen = {}

    def grab(gm, example_inputs):
        seen["gm"], seen["inputs"], seen["result"] = gm, example_inputs, rewrite(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(**batch)
    return seen["gm"], seen["inputs"], seen["result"]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_backend_is_registered_by_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(ep.name == "adapt_compiler" and ep.load() is be.adapt_compiler_backend for ep in eps)
    assert "adapt_compiler" in torch._dynamo.list_backends(exclude_tags=())
    assert torch._dynamo.lookup_backend("adapt_compiler") is be.adapt_compiler_backend
    assert ac.backend() is be.adapt_compiler_backend


def test_peft_lora_subgraph_is_fused_in_the_dynamo_graph():
    """The pattern pass alone (no Inductor): structure, outputs and gradients against PEFT."""
    base = tiny_llama(layers=1)
    pm = _peft_lora(base, dropout=0.1)  # eval: dropout(x, p, training=False) is matched as identity
    batch = token_batch()
    linears = {}

    def rewrite(gm, _):
        linears["before"] = _targets(gm).count(torch._C._nn.linear)
        return be.fuse_peft_lora(gm)

    gm, inputs, count = _dynamo_graph(pm, batch, rewrite)
    linears_before = linears["before"]
    assert count == len(TARGETS)
    fused = torch.ops.adapt_compiler.fused_lora_linear.default
    assert _targets(gm).count(fused) == len(TARGETS)
    assert _targets(gm).count(torch._C._nn.linear) == linears_before - 3 * len(TARGETS)
    assert not any(t is torch.nn.functional.dropout for t in _targets(gm))
    ours = gm(*inputs)[0]
    theirs = pm(**batch).logits
    assert_close(ours, theirs)
    # gradients flow through the op's registered backward like through PEFT's modules
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_training_dropout_is_left_alone():
    base = tiny_llama(layers=1)
    pm = _peft_lora(base, dropout=0.5).train()
    _, _, count = _dynamo_graph(pm, token_batch(), lambda gm, _: be.fuse_peft_lora(gm))
    assert count == 0  # dropout(training=True) changes the LoRA input: not our op


def test_peft_model_compiles_by_name_and_matches_peft():
    base = tiny_llama(layers=1)
    pm = _peft_lora(base)
    batch = token_batch()
    before = COUNTERS["backend_peft_lora_fused"]
    torch._dynamo.reset()
    out = torch.compile(pm, backend="adapt_compiler")(**batch)
    assert COUNTERS["backend_peft_lora_fused"] - before == len(TARGETS)
    assert_close(out.logits, pm(**batch).logits)


def test_backend_merge_from_peft_dir_serves_plain_model(tmp_path):
    base = tiny_llama(layers=1)
    pm = _peft_lora(base)
    pm.save_pretrained(tmp_path)
    batch = token_batch()
    before = copy.deepcopy(base.state_dict())
    torch._dynamo.reset()
    out = torch.compile(base, backend=ac.backend(tmp_path, merge=True))(**batch)
    assert_close(out.logits, pm(**batch).logits)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the model must stay untouched"
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, out.logits)


@pytest.mark.parametrize("merge", [False, True])
def test_backend_rewrites_plain_graph(tmp_path, merge):
    """ac.backend(dir, merge=...) rewrites (constant W' or the fused op), checked without Inductor."""
    base = tiny_llama(layers=1)
    pm = _peft_lora(base)
    pm.save_pretrained(tmp_path)
    batch = token_batch()
    backend = ac.backend(tmp_path, merge=merge)
    gm, inputs, count = _dynamo_graph(base, batch, backend.apply_spec)
    assert count == len(TARGETS)
    fused = _targets(gm).count(torch.ops.adapt_compiler.fused_lora_linear.default)
    assert fused == (0 if merge else len(TARGETS))
    with torch.no_grad():
        assert_close(gm(*inputs)[0], pm(**batch).logits)


def test_backend_errors_are_clear(tmp_path):
    with pytest.raises(AdapterError, match="needs the adapter"):
        ac.backend(merge=True)
    with pytest.raises(AdapterError, match="explicit targets"):
        ac.backend(ac.LoRA(r=4), merge=True)


# -- torch.compile(AdaptedModule, fullgraph=True) for every method ---------------------------------
# fields some specs require beyond `targets` (tried after the generic r=4 / defaults); a new method
# whose spec builds from targets alone needs no entry here
REQUIRED = {
    "adalora": {"total_step": 10},
    "oft": {"r": 0, "oft_block_size": 16},
    "llama_adapter": {"adapter_len": 4, "adapter_layers": 1},
    "xlora": {"experts": {"e1": ac.LoRA(r=2, targets=["q_proj"]), "e2": ac.LoRA(r=2, targets=["q_proj"])}},
}


def _tiny_spec(name, method):
    """A small spec of any registered method, or None (with why) if it cannot be built generically."""
    graph = isinstance(method, GraphMethod)
    if not graph and "linear" not in getattr(method, "kinds", frozenset({"linear"})):
        return None, f"{name}: does not adapt Linear layers"
    why = "spec cannot be built from targets alone"
    for kw in ({"r": 4}, {}, REQUIRED.get(name)):
        if kw is None:
            continue
        try:
            return method.spec_type(**kw) if graph else method.spec_type(targets=TARGETS, **kw), None
        except (TypeError, AdapterError) as err:
            why = str(err)
    return None, f"{name}: {why}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapted_module_compiles_fullgraph_without_breaks(name):
    spec, why = _tiny_spec(name, METHODS[name])
    if spec is None:
        pytest.skip(why)
    base, batch = tiny_llama(layers=1), token_batch()
    try:
        m = ac.compile(base, spec, lowering="eager", example_inputs=batch)
    except AdapterError as err:
        pytest.skip(f"{name}: tiny spec does not fit the tiny model ({err})")
    with torch.no_grad():  # non-trivial adapter values, so the adapter shows in the output
        for p in m.adapter_parameters():
            p.add_(0.05 * torch.randn_like(p))
    eager = logits_of(m(**batch))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    out = logits_of(compiled(**batch))
    logits_of(compiled(**batch))
    assert counter.frame_count == 1, "one graph"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert_close(out, eager)
