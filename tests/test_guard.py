"""The correctness guard: each compiled graph's first call is checked against the eager graph.

Faults are injected with deliberately broken torch.compile backends (AOTAutograd with a forward or
backward compiler that perturbs what it returns), so the guard is shown to catch wrong outputs and
wrong gradients without depending on a real compiler bug.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import adapt_compiler as ac
from adapt_compiler.lowering.guard import CompilerMismatchWarning
from models import tiny_llama, token_batch
from oracle import adapter_grads_ours, assert_close


def _scaled(factor: float, where: str):
    """A backend whose forward (where="fw") or backward ("bw") outputs are multiplied by `factor`."""
    def wrong(gm, _):
        return make_boxed_func(lambda *a: [o * factor if isinstance(o, torch.Tensor) else o for o in gm(*a)])

    def right(gm, _):
        return make_boxed_func(gm)

    fw, bw = (wrong, right) if where == "fw" else (right, wrong)
    backend = aot_autograd(fw_compiler=fw, bw_compiler=bw, inference_compiler=fw)
    backend.__name__ = f"broken_{where}"
    return backend


def _pair(lowering, verify=True):
    base = tiny_llama(layers=1)
    spec = ac.LoRA(r=4, targets=["q_proj", "v_proj"], init=False)
    ref = ac.compile(base, spec, lowering="eager").train()
    m = ac.compile(base, spec, lowering=lowering, verify=verify).train()
    m.load_adapter_state_dict(ref.adapter_state_dict())
    return ref, m


def _step(m, batch):
    out = m(**batch)
    out.loss.backward()
    return out.loss.detach(), adapter_grads_ours(m)


def test_wrong_gradients_are_caught_warned_and_fixed():
    torch._dynamo.reset()
    ref, m = _pair(_scaled(0.5, "bw"))
    batch = token_batch(labels=True)
    want_loss, want = _step(ref, batch)
    with pytest.warns(CompilerMismatchWarning, match=r"broken_bw lowering .* disagrees .* grad default:"):
        loss, got = _step(m, batch)
    assert_close(loss, want_loss, what="loss")
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], what=f"grad {k}")  # the user got eager's gradients, not the bad ones
    (verdict,) = [v for _, v in m.report().checks]
    assert verdict.status == "mismatch" and verdict.lowering == "eager" and verdict.mismatches
    assert "MISMATCH" in str(m.report())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)  # one warning per graph, not per step
        m.zero_grad()
        _, again = _step(m, batch)
    for k in want:
        assert_close(again[k], want[k], what=f"second step grad {k}")


def test_wrong_eval_outputs_are_caught():
    torch._dynamo.reset()
    ref, m = _pair(_scaled(1.01, "fw"))
    ref.eval()
    m.eval()
    batch = token_batch()
    with torch.no_grad():
        want = ref(**batch).logits
        with pytest.warns(CompilerMismatchWarning, match="output 0"):
            got = m(**batch).logits
    assert_close(got, want)


def test_verify_false_trusts_the_compiler():
    """Without the guard the injected fault reaches the user (so the guard is what protects)."""
    torch._dynamo.reset()
    ref, m = _pair(_scaled(0.5, "bw"), verify=False)
    batch = token_batch(labels=True)
    _, want = _step(ref, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)
        _, got = _step(m, batch)
    k = next(iter(want))
    assert_close(got[k], 0.5 * want[k], what="the broken backend's gradient")
    assert m.report().checks == []


def test_a_correct_compiler_passes_and_keeps_dropout_masks():
    """aot_eager is right: the check passes, and with dropout the compiled graph draws the same
    masks as eager from the same seed (so the comparison is exact, and a seed gives PEFT's masks)."""
    torch._dynamo.reset()
    base = tiny_llama(layers=1)
    spec = ac.LoRA(r=4, targets=["q_proj"], init=False, dropout=0.3)
    ref = ac.compile(base, spec, lowering="eager").train()
    correct = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=lambda gm, _: make_boxed_func(gm))
    m = ac.compile(base, spec, lowering=correct, verify=True).train()
    m.load_adapter_state_dict(ref.adapter_state_dict())
    batch = token_batch(labels=True)
    torch.manual_seed(3)
    want_loss, want = _step(ref, batch)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)
        loss, got = _step(m, batch)
    assert_close(loss, want_loss, what="loss with dropout")
    for k in want:
        assert_close(got[k], want[k], what=f"grad {k}")
    (verdict,) = [v for _, v in m.report().checks]
    assert verdict.status == "passed" and verdict.compared > 2


def test_each_shape_class_of_a_dynamic_compile_is_checked():
    """A whole-graph compile dynamic in batch compiles once more for a batch of one
    (lowering/dynamic.py): a fault only in that specialisation is caught at its first call."""
    from torch import fx, nn

    from adapt_compiler.lowering.guard import guard

    gm = fx.symbolic_trace(nn.Linear(4, 3))
    reference_calls = []
    gm.register_forward_pre_hook(lambda *_: reference_calls.append(1))

    class WrongAtBatchOne:
        def __call__(self, x):
            out = gm(x)
            return out * 1.5 if x.shape[0] == 1 else out

        def shape_class(self, args, kwargs):
            return (min(args[0].shape[0], 2),)

    guarded = guard(gm, WrongAtBatchOne(), "fake", lambda: [("weight", gm.weight)], lambda: [],
                    [("eager", lambda: gm)], "the test graph")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)
        guarded(torch.randn(3, 4))
        assert guarded.verdict.status == "passed" and guarded.verdict.shape_classes == 1
        calls = len(reference_calls)
        guarded(torch.randn(5, 4))  # same class: not checked again
        assert len(reference_calls) == calls + 1  # only the candidate's own call of gm
    x = torch.randn(1, 4)
    with pytest.warns(CompilerMismatchWarning, match="at a new shape class"):
        out = guarded(x)
    assert_close(out, gm(x), what="a batch of one after the fallback")
    assert guarded.verdict.status == "mismatch" and guarded.verdict.lowering == "eager"
    assert guarded.verdict.shape_classes == 2


def test_a_backward_that_reuses_its_saved_buffers_gives_the_user_right_gradients():
    """A compiled backward may overwrite the tensors it saved from the forward once it has used them
    (Inductor's donated buffers; a backward compiled with donation can be served from Inductor's cache,
    whose key does not cover it). Its first backward is right, a second one through the same graph is
    not. The guard's check runs a backward; the user's backward must not be the second through that
    graph (the check passes, and before the fix the user's gradients were wrong with no warning)."""
    torch._dynamo.reset()

    kept = set()  # storages of the forward's inputs (parameters, the batch): never donated, activations are

    def storages(xs):
        return {x.untyped_storage().data_ptr() for x in xs if isinstance(x, torch.Tensor)}

    def forward(gm, _):
        def run(*args):
            out = gm(*args)
            kept.update(storages(args))
            return out

        return make_boxed_func(run)

    def donating(gm, _):
        def run(*args):
            out = gm(*args)
            for a in args:  # the activations the backward saved, overwritten after use (behind autograd's back,
                # as generated code writing into a donated buffer does)
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.untyped_storage().data_ptr() not in kept:
                    a.data.mul_(0.5)
            return out

        return make_boxed_func(run)

    backend = aot_autograd(fw_compiler=forward, bw_compiler=donating)
    backend.__name__ = "donating"
    ref, m = _pair(backend)
    batch = token_batch(labels=True)
    want_loss, want = _step(ref, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompilerMismatchWarning)  # the compiled code is right: the check passes
        loss, got = _step(m, batch)
    (verdict,) = [v for _, v in m.report().checks]
    assert verdict.status == "passed" and verdict.lowering == "donating"
    assert_close(loss, want_loss, what="loss")
    for k in want:
        assert want[k].abs().max() > 0, k
        assert_close(got[k], want[k], what=f"grad {k}")  # the user's backward was the first through its graph


def test_after_each_checked_first_call_the_freed_memory_is_returned_and_the_reference_is_gone(monkeypatch):
    """A first call compiles and runs the eager reference (forward and backward) besides the compiled
    graph; their memory is handed back to the system once per checked shape class (`return_freed_memory`:
    a full collection, then glibc's malloc_trim), after the reference's outputs and autograd graph are
    unreferenced (else the trim could not return them and the process would keep the first call's
    high-water mark between steps, benchmarks/memory_budget.py). Later calls of a checked class do not."""
    from torch import fx, nn

    from adapt_compiler.lowering import guard as guard_module

    gm = fx.symbolic_trace(nn.Linear(4, 3))
    # a weak reference to the memory of each output of the eager reference graph: the storage object lives
    # as long as any tensor on it does (the check's detached copies of the outputs included)
    reference_out = []
    gm.register_forward_hook(lambda _m, _a, out: reference_out.append(weakref.ref(out.untyped_storage())))

    def compiled(x):
        return torch.nn.functional.linear(x, gm.weight, gm.bias)

    compiled.shape_class = lambda args, kwargs: (min(args[0].shape[0], 2),)
    released = []  # per call of return_freed_memory: was every reference output already freed?
    monkeypatch.setattr(guard_module, "return_freed_memory",
                        lambda: released.append(all(r() is None for r in reference_out)))
    guarded = guard_module.guard(gm, compiled, "fake", lambda: [("weight", gm.weight)], lambda: [],
                                 [("eager", lambda: gm)], "the test graph")
    out = guarded(torch.randn(3, 4))
    assert guarded.verdict.status == "passed"
    assert reference_out and released == [True]
    out.sum().backward()  # the user's output still has its autograd graph
    assert gm.weight.grad is not None
    guarded(torch.randn(5, 4))  # same shape class: nothing to check, nothing to return
    assert released == [True]
    guarded(torch.randn(1, 4))  # a new shape class: checked, then returned again
    assert released == [True, True] and len(reference_out) == 2


def test_unverified_graphs_return_freed_memory_once_per_shape_class_after_the_first_step(monkeypatch):
    """verify=False: no check, but the compile's garbage (the backward's too, compiled at the user's
    backward after the first call returns) is returned at the second call of each shape class, once."""
    from adapt_compiler.lowering import guard as guard_module

    calls = []
    compiled = lambda x: calls.append(x.shape[0]) or x  # noqa: E731
    compiled.shape_class = lambda args, kwargs: (min(args[0].shape[0], 2),)
    released = []
    monkeypatch.setattr(guard_module, "return_freed_memory", lambda: released.append(len(calls)))
    served = guard_module.TrimAfterFirstStep(compiled)
    for rows in (3, 5, 4, 1, 1, 1):  # class 2 three times, then class 1 three times
        served(torch.randn(rows, 2))
    assert calls == [3, 5, 4, 1, 1, 1]
    assert released == [1, 4], "before the second call of each class, not before later ones"


def test_return_freed_memory_runs_on_this_platform():
    """The real call (a full collection and, on glibc, malloc_trim) works here and finds the trim."""
    import platform
    import sys

    from adapt_compiler.lowering.guard import _malloc_trim, return_freed_memory

    return_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
