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
from safetensors.torch import load_file, save_file
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.testing import CompileCounter

import adapt_compiler as ac
from adapt_compiler.errors import CheckpointError
from adapt_compiler.lowering import backend as be
from adapt_compiler.passes import COUNTERS, METHODS
from adapt_compiler.passes.match import describe_layer, layer_from_node, layer_operands
from adapt_compiler.passes.method import AdapterError, GraphMethod
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import assert_close, logits_of, peft_twin, randomize_

TARGETS = ["q_proj", "v_proj"]


def _peft_lora(base, dropout=0.0):
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout))
    randomize_(pm, ("lora_",))
    return pm


def _dynamo_graph(model, batch, rewrite):
    """The FX graph Dynamo hands a backend after `rewrite(gm, example_inputs)` (run inside the backend,
    while Dynamo's placeholder metadata is still there), its example inputs, and rewrite's result.
    `batch`: keyword inputs (a dict) or one positional tensor."""
    seen = {}

    def grab(gm, example_inputs):
        seen["gm"], seen["inputs"], seen["result"] = gm, example_inputs, rewrite(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab, fullgraph=True)
    compiled(**batch) if isinstance(batch, dict) else compiled(batch)
    return seen["gm"], seen["inputs"], seen["result"]


def _compile_error(model, batch, backend) -> Exception:
    """The error `backend` raised at the first compile (Dynamo reports it as BackendCompilerFailed)."""
    torch._dynamo.reset()
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(model, backend=backend)(**batch)
    return info.value.inner_exception


def _structure(gm):
    return [(n.name, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes]


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


# -- the LoRA pattern is the whole pattern -------------------------------------------------------
class _LoraLike(nn.Module):
    """base + LoRA-shaped branches, some of which are not PEFT's LoRA and must not be fused."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.base = nn.Linear(8, 8)
        self.lora_A = nn.Linear(8, 2, bias=False)
        self.lora_B = nn.Linear(2, 8, bias=form == "lora_B with bias")
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        base, delta = self.base(x), self.lora_B(self.lora_A(x))
        if self.form == "scaling on the base output":
            return base * 2.0 + delta
        if self.form == "scaling is a tensor":
            return base + delta * self.scale
        if self.form == "LoRA of another input":
            return base + self.lora_B(self.lora_A(x.flip(-1))) * 2.0
        if self.form == "commuted":
            return 2.0 * delta + base
        return base + delta * 2.0  # "peft", "lora_B with bias"


# form -> LoRA subgraphs fused
FORMS = {
    "peft": 1,
    "commuted": 1,
    "scaling on the base output": 0,
    "scaling is a tensor": 0,
    "LoRA of another input": 0,
    "lora_B with bias": 0,
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fuse_peft_lora_only_rewrites_the_whole_pattern(form):
    model, x = _LoraLike(form).eval(), torch.randn(3, 5, 8)
    seen = {}

    def rewrite(gm, _):
        seen["before"], seen["code"] = _structure(gm), gm.code
        return be.fuse_peft_lora(gm)

    gm, inputs, count = _dynamo_graph(model, x, rewrite)
    assert count == FORMS[form]
    fused = torch.ops.adapt_compiler.fused_lora_linear.default
    if count:
        assert _targets(gm).count(fused) == 1 and torch._C._nn.linear not in _targets(gm)
    else:  # the graph is left exactly as Dynamo made it
        assert _structure(gm) == seen["before"] and gm.code == seen["code"]
    with torch.no_grad():
        assert_close(gm(*inputs)[0], model(x))


# -- checkpoints: the same checks and messages as ac.compile(model, dir) ---------------------------
def _edit_checkpoint(path, edit) -> None:
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def _missing_key(path, base) -> str:
    _peft_lora(base).save_pretrained(path)
    dropped = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    _edit_checkpoint(path, lambda t: t.pop(dropped))
    return f"missing keys (1): {dropped}"


def _other_model(path, base) -> str:
    _peft_lora(tiny_llama(layers=1, hidden=32, heads=2, kv_heads=1)).save_pretrained(path)
    return "shape mismatches (4): base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: checkpoint (4, 32)"


@pytest.mark.parametrize("make, merge", [(_missing_key, False), (_missing_key, True), (_other_model, True)],
                         ids=["missing-key-unmerged", "missing-key-merged", "other-model-merged"])
def test_backend_rejects_checkpoints_that_do_not_fit_like_compile(tmp_path, make, merge):
    base, batch = tiny_llama(layers=1), token_batch()
    needle = make(tmp_path, base)
    with pytest.raises(CheckpointError) as want:
        ac.compile(base, tmp_path)
    backend = ac.backend(tmp_path, merge=merge)  # keys and shapes are checked against the model's graph
    err = _compile_error(base, batch, backend)
    assert isinstance(err, CheckpointError), repr(err)
    assert str(err) == str(want.value)
    assert needle in str(err) and "Fix:" in str(err), str(err)


def test_backend_rejects_nan_checkpoint_like_compile(tmp_path):
    base = tiny_llama(layers=1)
    _peft_lora(base).save_pretrained(tmp_path)
    poisoned = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def poison(tensors):
        tensors[poisoned][0, 0] = float("nan")

    _edit_checkpoint(tmp_path, poison)
    with pytest.raises(CheckpointError) as want:
        ac.compile(base, tmp_path)
    for merge in (False, True):  # refused by ac.backend() itself, before any compile
        with pytest.raises(CheckpointError) as got:
            ac.backend(tmp_path, merge=merge)
        assert str(got.value) == str(want.value)
        assert "NaN/Inf" in str(got.value) and poisoned in str(got.value)


# -- Conv2d through ac.backend(merge=True) ---------------------------------------------------------
CONVS = ["conv1", "conv2", "down", "proj"]  # `down` has stride 2: geometry comes from the op's arguments


def test_backend_merges_conv2d_like_peft(tmp_path):
    base, x = tiny_convnet(), image_batch()
    pm = peft_twin(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=CONVS))
    randomize_(pm, ("lora_",))
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        want = copy.deepcopy(pm).merge_and_unload()(x)
        plain = base(x)
    before = copy.deepcopy(base.state_dict())
    modules = dict(base.named_modules())
    backend = ac.backend(tmp_path, merge=True)
    described = {}

    def rewrite(gm, inputs):
        # the graph's description of each conv (from the op) equals the module's own description
        paths = {n: be._module_path(n) for n in gm.graph.nodes if n.op == "placeholder"}
        values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.conv2d:
                _, w, b = layer_operands(node)
                fqn = paths[w].removesuffix(".weight")
                described[fqn] = (layer_from_node(fqn, node, values[w], b is not None), describe_layer(fqn, modules[fqn]))
        return backend.apply_spec(gm, inputs)

    gm, inputs, count = _dynamo_graph(base, x, rewrite)
    assert count == 6  # conv1 and conv2 of two blocks, down, proj
    assert len(described) == 8 and all(ours == theirs for ours, theirs in described.values()), described
    assert described["down"][0].stride == (2, 2) and described["down"][0].padding == (1, 1)
    with torch.no_grad():
        out = gm(*inputs)[0]
    assert_close(out, want)
    assert not torch.allclose(out, plain), "the adapter must show in the output"
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the model must stay untouched"


# -- torch.compile(AdaptedModule, fullgraph=True) for every method ---------------------------------
# the tiny spec of each registered method (targets are added for weight methods); a method not
# listed gets r=4. A new method whose spec cannot be built so fails below: give it an entry here.
TINY = {
    "adalora": {"total_step": 10},
    "boft": {},
    "oft": {"r": 0, "oft_block_size": 16},
    "llama_adapter": {"adapter_len": 4, "adapter_layers": 1},
    "xlora": {"experts": {"e1": ac.LoRA(r=2, targets=["q_proj"]), "e2": ac.LoRA(r=2, targets=["q_proj"])}},
}


def _tiny_spec(name, method):
    kw = TINY.get(name, {"r": 4})
    try:
        return method.spec_type(**kw) if isinstance(method, GraphMethod) else method.spec_type(targets=TARGETS, **kw)
    except (TypeError, AdapterError) as err:
        pytest.fail(f"{name}: its tiny spec {kw} cannot be built ({type(err).__name__}: {err}); fix its TINY entry.")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapted_module_compiles_fullgraph_without_breaks(name):
    method = METHODS[name]
    spec = _tiny_spec(name, method)
    base, batch = tiny_llama(layers=1), token_batch()
    if not isinstance(method, GraphMethod) and "linear" not in method.kinds:
        with pytest.raises(AdapterError, match="does not support linear"):  # the targets are Linear layers
            ac.compile(base, spec, lowering="eager")
        return
    try:
        m = ac.compile(base, spec, lowering="eager", example_inputs=batch)
    except AdapterError as err:
        pytest.fail(f"{name}: the tiny spec {spec!r} does not fit the tiny Llama: {err}")
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
