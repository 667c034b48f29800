"""lowering="auto": eager calls while the whole graph compiles in a background thread, then the compiled graph.

Most tests inject a cheap compiler (AOTAutograd with the graphs run as they are) as the backend of the
background compile, gated by events: the test decides when the compile may finish, so "eager
before, compiled after" is asserted by call counts and Dynamo's counters, not by timing, and the
eager steps provably run while the compile is in progress. One slow test compiles with Inductor.

torch 2.13 patches nn.Module.__call__ for every thread while FX traces, and AOTAutograd traces with FX
on every compile, so ac.compile refuses lowering="auto" there (auto.unavailable()). These tests enable
it anyway (ADAPT_COMPILER_AUTO_UNSAFE=1) and keep the hazard out by construction: the gate holds the
background compile before AOTAutograd until the main thread waits for it, so no module is called on
the main thread while FX traces.
"""

from __future__ import annotations

import threading

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import adapt_compiler as ac
from adapt_compiler import progress
from adapt_compiler.errors import AdapterError
from adapt_compiler.lowering import auto
from models import tiny_llama, token_batch
from oracle import adapter_grads_ours, assert_close


class _Gated:
    """A backend that says when the background compile reached it (`entered`), compiles only once the
    test allows it (`go`), and counts the compiled graphs' runs per thread."""

    def __init__(self, fail: bool = False, inner=None):
        self.entered, self.go, self.fail = threading.Event(), threading.Event(), fail
        self.threads, self.runs = [], {"main": 0, "other": 0}
        self.aot = inner or aot_autograd(fw_compiler=self._counted, bw_compiler=self._counted)

    def finish(self, program) -> None:
        """Let the compile go on while this (the main) thread only waits for it; gate the next one."""
        self.go.set()
        assert program.wait(600), "the background compile did not finish"
        self.go.clear()

    def _counted(self, gm, _):
        def run(*args):
            self.runs["main" if threading.current_thread() is threading.main_thread() else "other"] += 1
            return gm(*args)
        return make_boxed_func(run)

    def __call__(self, gm, example_inputs):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.go.wait(120), "the test never let the compile finish"
        if self.fail:
            raise RuntimeError("injected backend failure")
        return self.aot(gm, example_inputs)


@pytest.fixture
def gated(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setenv("ADAPT_COMPILER_AUTO_UNSAFE", "1")  # see the module docstring
    backend = _Gated()
    monkeypatch.setattr(auto, "inner_backend", backend)
    yield backend
    backend.go.set()  # never leave a background thread waiting


def _programs(m):
    return [gm.meta["ac_auto"] for es in m._graphs.values() for e in es for gm in e.graphs.values()
            if "ac_auto" in gm.meta]


def _pair(dropout: float = 0.0):
    base = tiny_llama(layers=1)
    spec = ac.LoRA(r=4, targets=["q_proj", "v_proj"], init=False, dropout=dropout)
    ref = ac.compile(base, spec, lowering="eager").train()
    m = ac.compile(base, spec, lowering="auto").train()
    m.load_adapter_state_dict(ref.adapter_state_dict())
    return ref, m


def _train(m, batch, steps: int, between=None):
    """`steps` SGD steps from seed 1; `between(i)` runs after step i. (loss, grads) of each step."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.5)
    out = []
    for i in range(steps):
        loss = m(**batch).loss
        loss.backward()
        out.append((loss.detach(), {k: g.clone() for k, g in adapter_grads_ours(m).items()}))
        opt.step()
        opt.zero_grad()
        if between is not None:
            between(i)
    return out


def _assert_same_run(got, want, rtol=1e-5, atol=1e-6):
    assert len(got) == len(want)
    for step, ((loss, grads), (want_loss, want_grads)) in enumerate(zip(got, want)):
        assert_close(loss, want_loss, rtol, atol, what=f"step {step + 1} loss")
        assert set(grads) == set(want_grads) and grads
        for k in grads:
            assert_close(grads[k], want_grads[k], rtol, atol, what=f"step {step + 1} grad {k}")


def test_unknown_lowering_lists_auto():
    with pytest.raises(AdapterError, match=r"lowering='autox' is not one of .*'auto'"):
        ac.compile(tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj"]), lowering="autox")


def test_auto_is_refused_where_fx_tracing_patches_every_thread():
    """The probe traces a module on another thread and calls one here meanwhile; where that call lands in
    the other thread's tracer (torch 2.13), lowering="auto" is refused up front, with the reason."""
    isolated = auto._fx_tracing_isolated()
    model, spec = tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj"])
    if isolated:
        assert auto.unavailable() is None
        ac.compile(model, spec, lowering="auto")
    else:
        with pytest.raises(AdapterError, match=r"lowering='auto' is not available here: .*pytorch/pytorch#187589.*"
                                               r"lowering='inductor'"):
            ac.compile(model, spec, lowering="auto")


def test_switch_keeps_the_numbers_of_eager_lowering_with_dropout(gated, monkeypatch, capsys):
    """Steps 1-3 run eager while the compile is held open (so Dynamo's RNG save/restore spans them),
    steps 4-6 the compiled graph: losses and every adapter gradient equal the eager lowering's, dropout
    masks included, and the background compile ran nothing."""
    monkeypatch.setattr(progress, "_interactive", lambda: True)  # the progress lines, as on a terminal
    ref, m = _pair(dropout=0.3)
    batch = token_batch(labels=True)
    want = _train(ref, batch, 6)
    graphs_before = counters["stats"]["unique_graphs"]

    def between(i):
        if i == 0:
            assert gated.entered.wait(120)  # Dynamo has noted the RNG state: steps 2-3 draw after it
        if i == 2:
            program, = _programs(m)
            assert (program.status, program.eager_calls, program.compiled_calls) == ("compiling", 3, 0)
            assert counters["stats"]["unique_graphs"] == graphs_before
            gated.finish(program)
            assert program.status == "compiled", program.status

    got = _train(m, batch, 6, between)
    _assert_same_run(got, want)
    program, = _programs(m)
    assert (program.eager_calls, program.compiled_calls, program.switched_at) == (3, 3, 4)
    assert counters["stats"]["unique_graphs"] == graphs_before + 1  # compiled once, in the background
    assert gated.threads == ["adapt_compiler-auto-compile"]
    # the background compile ran no forward; the main thread ran the compiled graph from step 4 (the
    # guard's first call: forward + its check's backward + the user's backward, then 2 × forward + backward)
    assert gated.runs["other"] == 0 and gated.runs["main"] >= 6
    rep = str(m.report())
    assert "auto train/adapted#0: eager for calls 1-3 while Inductor compiled" in rep
    assert "compiled from call 4 (3 calls so far)" in rep
    assert "compiled graph train/adapted#0: checked against eager" in rep  # the guard checked the switch
    err = capsys.readouterr().err
    assert "compiling with Inductor in the background" in err and "call 4 onwards run it (3 ran eager)" in err


def test_train_and_eval_graphs_switch_separately(gated):
    ref, m = _pair()
    batch = token_batch(labels=True)
    _train(ref, batch, 1)
    _train(m, batch, 1)
    train_program, = _programs(m)
    gated.finish(train_program)
    assert train_program.status == "compiled"
    ref.eval(), m.eval()
    with torch.no_grad():
        want = ref(**batch).logits
        first = m(**batch).logits  # eager: the eval graph's own compile starts now
        eval_program = next(p for p in _programs(m) if p is not train_program)
        assert eval_program.eager_calls == 1
        gated.finish(eval_program)
        assert eval_program.status == "compiled"
        second = m(**batch).logits  # compiled
    assert eval_program.compiled_calls == 1 and train_program.compiled_calls == 0
    assert_close(first, want, what="eval before the switch")
    assert_close(second, want, what="eval after the switch")
    assert len(gated.threads) == 2 and gated.runs["other"] == 0


def test_new_input_shapes_compile_in_the_background_too(gated):
    """After the switch, a new sequence length runs eager while Dynamo recompiles in the background
    (then dynamically, so a third length reuses that graph); nothing compiles on the main thread."""
    ref, m = _pair()
    short, longer, longest = (token_batch(labels=True, seq=n) for n in (7, 9, 11))
    m(**short).loss.backward()
    program, = _programs(m)
    gated.finish(program)
    assert program.status == "compiled"
    m(**short).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    assert (program.eager_calls, program.compiled_calls) == (1, 1)
    out = m(**longer)  # new shape: eager, and a background compile for it
    assert (program.eager_calls, program.compiled_calls, program.rewarms) == (2, 1, 1)
    gated.finish(program)
    assert program.status == "compiled", program.status
    outs = [m(**longer), m(**longest)]  # both compiled now: the recompile made the length dynamic
    assert (program.eager_calls, program.compiled_calls, program.rewarms) == (2, 3, 1)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and gated.runs["other"] == 0
    with torch.no_grad():
        for got, batch in zip([out, *outs], (longer, longer, longest)):
            assert_close(got.logits, ref(**batch).logits, what=f"logits at seq {batch['input_ids'].shape[1]}")
    assert "1 more background compile(s) for new input shapes" in str(m.report())


def test_failed_background_compile_keeps_eager_and_says_why(gated):
    gated.fail = True
    ref, m = _pair()
    batch = token_batch(labels=True)
    want = _train(ref, batch, 3)

    def between(i):
        if i == 0:
            program, = _programs(m)
            gated.finish(program)
            assert program.status.startswith("failed")

    with pytest.warns(auto.AutoCompileWarning, match=r"could not compile LlamaForCausalLM .*injected backend failure"):
        got = _train(m, batch, 3, between)
    _assert_same_run(got, want, rtol=0, atol=0)  # eager all along: bit for bit
    program, = _programs(m)
    assert (program.eager_calls, program.compiled_calls) == (3, 0)
    assert "background compile failed: BackendCompilerFailed" in str(m.report())
    assert "injected backend failure" in str(m.report())


@pytest.mark.slow
def test_inductor_switch_matches_eager_lowering(monkeypatch):
    """The real thing: Inductor in the background (about 15-30 s on 2 CPU cores), gated as above."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv("ADAPT_COMPILER_AUTO_UNSAFE", "1")
    inductor = torch._TorchCompileInductorWrapper(None, {"fallback_random": True}, None)  # what auto compiles with
    gated = _Gated(inner=inductor)
    monkeypatch.setattr(auto, "inner_backend", gated)
    ref, m = _pair(dropout=0.1)
    batch = token_batch(labels=True)
    want = _train(ref, batch, 5)

    def between(i):
        if i == 1:
            program, = _programs(m)
            assert gated.entered.wait(120)
            assert counters["stats"]["unique_graphs"] == 0
            gated.finish(program)
            assert program.status == "compiled", program.status
            assert counters["stats"]["unique_graphs"] == 1

    got = _train(m, batch, 5, between)
    _assert_same_run(got, want, rtol=1e-4, atol=1e-5)
    program, = _programs(m)
    assert program.eager_calls == 2 and program.compiled_calls == 3 and program.compile_s > 0
    assert counters["stats"]["unique_graphs"] == 1  # nothing compiled on the main thread
    check, = m._checks()
    assert check[1].status == "passed" and check[1].lowering == "inductor"
