"""Where a first step's time goes: wall and CPU seconds per phase, by wrapping the functions that do each.

    with Phases() as ph:
        m = ac.compile(...); loss = m(**batch).loss; loss.backward()
    ph.seconds()   # {"cache_load": (wall, cpu), "capture": ..., ...}

Phases (each a function of the library or of torch, timed where it is called; nested phases are
subtracted from their parent, so the parts add up to the span they cover):
  cache_load        compile_cache.load (reading, checking the key, restoring kernels, load_cache_artifacts)
  capture           torch.export of the base model (pipeline.capture)
  passes            pipeline.build: the adapter passes and the plan
  lower             pipeline.lower: wrapping the graph (torch.compile objects; the guard)
  guard_reference   the guard's eager reference run (forward + autograd.grad over the FX graph)
  dynamo            Dynamo's trace of the adapted graph, minus the backend below
  aot_inductor      the backend: AOTAutograd + Inductor (on a warm start: cache lookups and loading the
                    compiled modules)
  regional_prepare  lowering="regional": inlining the slots, partitioning, grouping (compile_regions)
  regional_compile  lowering="regional": making each block's fake inputs and copying its graph; its
                    AOTAutograd + Inductor compile is counted in aot_inductor
  compiled_run      the rest of the guard's compiled call: running the compiled forward and backward
The remainder of the span (the user's own backward, the optimizer) is the caller's to name.
Process-global patches; meant for the benchmark's child processes only.
"""

from __future__ import annotations

import contextlib
import resource
import time


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class Phases(contextlib.AbstractContextManager):
    def __init__(self):
        self.total: dict[str, list[float]] = {}
        self.stack: list[list] = []  # [name, wall0, cpu0, child wall, child cpu]
        self.undo: list = []

    # -- timing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, time.perf_counter(), _cpu(), 0.0, 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            wall, cpu = time.perf_counter() - frame[1], _cpu() - frame[2]
            own = self.total.setdefault(name, [0.0, 0.0])
            own[0] += wall - frame[3]
            own[1] += cpu - frame[4]
            if self.stack:
                self.stack[-1][3] += wall
                self.stack[-1][4] += cpu

    def wrap(self, owner, attr: str, name):
        """Time every call of owner.attr as phase `name` (a str, or a function of the call's arguments)."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            label = name(*args) if callable(name) else name
            with self.phase(label):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, original))

    def __enter__(self):
        import torch._dynamo.convert_frame as convert_frame
        from torch import fx
        import torch._inductor.compile_fx as compile_fx

        from adapt_compiler import compile_cache, pipeline
        from adapt_compiler.lowering import aot_region, guard, regional

        self.wrap(compile_cache, "load", "cache_load")
        self.wrap(pipeline, "capture", "capture")
        self.wrap(pipeline, "build", "passes")
        self.wrap(pipeline, "lower", "lower")
        # the guard's runs: the reference is the FX graph itself (eager); the candidate is the compiled callable
        # (a warm start that reuses a saved verdict runs the candidate alone)
        self.wrap(guard, "_run", lambda fn, *_: "guard_reference" if isinstance(fn, fx.GraphModule) else "compiled_run")
        self.wrap(convert_frame, "_compile", "dynamo")
        self.wrap(compile_fx, "compile_fx", "aot_inductor")
        self.wrap(regional, "compile_regions", "regional_prepare")
        self.wrap(aot_region.AOTRegion, "_compile", "regional_compile")
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)
        return False

    def seconds(self) -> dict[str, tuple[float, float]]:
        return {k: (round(v[0], 3), round(v[1], 3)) for k, v in self.total.items()}
