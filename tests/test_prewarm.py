"""Inductor's CPU set-up in a background thread while the first capture runs (lowering/prewarm.py)."""

from __future__ import annotations

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from adapt_compiler.lowering import prewarm
from models import tiny_llama, token_batch


@pytest.fixture
def fresh_prewarm(monkeypatch):
    """The module's once-per-process state, reset for this test (and restored after it)."""
    monkeypatch.setattr(prewarm, "_THREAD", None)
    for key in ("cpu_setup_ms", "cpu_setup_waited_ms", "cpu_setup_failed"):
        COUNTERS.pop(key, None)


@pytest.mark.parametrize("lowering, kernels", [("inductor", True), ("regional", True), ("eager", None)])
def test_a_capture_for_a_cpu_compile_starts_the_setup(fresh_prewarm, monkeypatch, lowering, kernels):
    """A module whose graphs Inductor compiles for the CPU starts the set-up in ac.compile, and again
    (a no-op once started) at each capture; kernels too, as no compile cache was loaded. An eager
    lowering compiles nothing and starts nothing."""
    calls = []
    monkeypatch.setattr("adapt_compiler.module.start_cpu_setup", lambda kernels=True: calls.append(kernels))
    m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=["q_proj", "v_proj"]), lowering=lowering)
    assert calls == ([] if kernels is None else [kernels])
    m.capture(kwargs=token_batch())
    assert calls == ([] if kernels is None else [kernels, kernels])


def test_the_setup_thread_leaves_inductor_its_results(fresh_prewarm):
    """The thread probes the vector ISA (Inductor's per-process cache then holds the answer) and
    compiles the trivial kernel through Inductor's code cache, which loads and runs; once only."""
    from torch._inductor import codecache, cpu_vec_isa

    prewarm.start_cpu_setup()
    first = prewarm._THREAD
    prewarm.start_cpu_setup()  # a second capture: no second thread
    assert prewarm._THREAD is first
    prewarm.wait()
    assert not first.is_alive()
    assert COUNTERS["cpu_setup_failed"] == 0 and COUNTERS["cpu_setup_ms"] > 0
    assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 1
    kernel = codecache.CppPythonBindingsCodeCache.load_pybinding(["float*"], prewarm._TRIVIAL_KERNEL)
    out = torch.ones(1)
    kernel(out)
    assert out.item() == 0.0


def test_a_failing_setup_is_counted_and_left_to_inductor(fresh_prewarm, monkeypatch):
    """A probe that raises in the thread is counted, not raised: Inductor runs it again when it compiles
    and reports the error itself; wait() returns normally."""
    from torch._inductor import cpu_vec_isa

    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", broken)
    prewarm.start_cpu_setup()
    prewarm.wait()
    assert COUNTERS["cpu_setup_failed"] == 1
