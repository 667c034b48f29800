"""Inductor's once-per-process CPU set-up, run in a background thread while torch.export captures.

Before its first C++ kernel, a process with an empty Inductor cache dir pays two g++ jobs that do not
depend on the graph, on the critical path of the first step, after the capture:

* the vector-ISA probe (`pick_vec_isa`): one tiny C++ library compiled and loaded per candidate ISA,
  3.7 s on a quiet 2-core machine (6.8 s at load);
* the precompiled header of every CPU kernel (`cpp_prefix.h`, built at the first kernel's compile;
  it is what makes each later kernel compile about 3.7 s cheaper).

So `ac.compile` of a module whose graphs Inductor compiles for the CPU (or, failing that, its first
capture) starts them in a thread: the probe, then one trivial kernel compiled through Inductor's own
code cache with the flags every kernel gets, which builds that header. g++ runs on the other core while this thread traces (the thread holds the GIL only
between subprocesses), and `wait()` joins it before the first compile. With a warm cache dir both
are file lookups (0.6 s). Measured in benchmarks/first_step.py (README, "Time to first step").

Why this is safe next to a capture: the thread calls no nn.Module and traces nothing (the hazard
lowering/auto.py describes is FX's per-process patching of nn.Module.__call__); it writes files
under Inductor's cache dir with Inductor's own file lock, and the modules it imports are imported
here first, so no two threads import the same module. If the probe fails, it is left to fail again,
with Inductor's own message, when Inductor needs it.
"""

from __future__ import annotations

import importlib
import threading
import time

from ..counters import COUNTERS

_THREAD: threading.Thread | None = None
_LOCK = threading.Lock()


# the smallest kernel in Inductor's form: it includes the header every CPU kernel includes
_TRIVIAL_KERNEL = ('#include <torch/csrc/inductor/cpp_prefix.h>\n'
                   'extern "C" void kernel(float* out_ptr0)\n{\n    out_ptr0[0] = 0.0f;\n}\n')


def start_cpu_setup(kernels: bool = True) -> None:
    """Run Inductor's CPU set-up in a background thread, once per process (a no-op after that).
    `kernels=False` (a warm start from a saved compile cache, whose kernels need no compile): the probe only."""
    global _THREAD
    with _LOCK:
        if _THREAD is not None:
            return
        # imported here, in the caller's thread: the thread's own lazy imports then find them loaded
        importlib.import_module("torch._inductor.cpp_builder")
        from torch._inductor import codecache, cpu_vec_isa

        def set_up():
            t = time.perf_counter()
            try:
                cpu_vec_isa.pick_vec_isa()
                if kernels:
                    codecache.CppPythonBindingsCodeCache.load_pybinding(["float*"], _TRIVIAL_KERNEL)
            except Exception:  # noqa: BLE001 - Inductor does it again, and says what is wrong, when it compiles
                COUNTERS["cpu_setup_failed"] += 1
            COUNTERS["cpu_setup_ms"] += round((time.perf_counter() - t) * 1e3)

        _THREAD = threading.Thread(target=set_up, name="adapt_compiler-inductor-cpu-setup", daemon=True)
        _THREAD.start()


def wait() -> None:
    """Join the set-up thread (if one was started) before Inductor compiles: its results are cached per
    process and per cache dir, so Inductor then reads them instead of building them a second time alongside."""
    thread = _THREAD
    if thread is None or not thread.is_alive():
        return
    t = time.perf_counter()
    thread.join()
    COUNTERS["cpu_setup_waited_ms"] += round((time.perf_counter() - t) * 1e3)
