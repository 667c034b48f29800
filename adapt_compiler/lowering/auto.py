"""lowering="auto": start on the eager lowering, switch to the Inductor graph once it is compiled.

`compile_whole(gm, options)` is the whole-graph Inductor lowering (as `_whole`: torch.compile,
dynamic=None) through a backend that knows when it is being warmed up. `EagerUntilCompiled` is the
callable the pipeline returns: its first call starts a background thread that compiles that graph,
and every call until it is ready runs the FX graph as is (0 s compile). The call after it is ready
goes to the compiled graph, through the correctness guard when `verify` is on (its first compiled
call is checked against the eager graph, as with any lowering). Both run the same GraphModule over
the same adapter tensors, so a training run sees the same numbers across the switch.

How the background compile avoids touching the user's run:

* It does not run the model. torch.compile compiles on the first call, so the thread calls the
  compiled module on copies of the first call's inputs, and the backend's compiled function raises
  `_Compiled` instead of running when called from that thread: no forward, no dropout draws, no
  buffer updates (BatchNorm statistics), no autograd graph over the user's parameters. AOTAutograd
  compiles the backward lazily on the first backward; the thread asks for it now
  (`force_non_lazy_backward_lowering`, without donated buffers, as under the guard's
  `retain_graph=True`), so the first compiled training step does not compile.
* Dynamo saves the global RNG states (torch's, Python's `random`) when it starts compiling and
  restores them when it is done (convert_frame.preserve_global_state): after a compile of tens of
  seconds, that rewinds every random number the main thread drew meanwhile (dropout masks of the
  eager steps). The backend takes `_RNG_LOCK` when its compile is done, notes the states then, and
  the thread puts them back after Dynamo's restore; eager calls hold the same lock. A random draw
  the main thread makes outside the adapted module's forward during that short window (Dynamo's
  last bookkeeping, milliseconds) is still rewound; one inside a forward is not.
* The thread runs with the first call's grad mode, inference mode and autocast state (thread-local
  in torch), so Dynamo's guards accept the main thread's calls and nothing recompiles at the switch.

* torch.compiler.is_compiling() is one process-wide flag, True for a whole compile: `tracing_here()`
  is what the module asks instead, and captures/exports wait for a running background compile
  (torch.export saves and restores the same flag; interleaved, it could stay set).
* New input shapes after the switch run eager while Dynamo recompiles in the background (at most
  MAX_REWARMS times; the recompile makes the varied sizes dynamic, `_covered`).

Not safe on torch 2.13, so ac.compile refuses it there (`unavailable()`): FX tracing patches
nn.Module.__call__ for every thread, and AOTAutograd traces with FX on every compile, so the training
thread's module calls can land in the background tracer (pytorch/pytorch#187589 fixes it upstream).

A compile that fails leaves the graph on eager: a warning, and report() says why. A process that ends
while a graph still compiles waits for that compile to finish (a daemon thread killed inside Inductor
aborts the interpreter: "terminate called without an active exception"); Dynamo cannot cancel a
compile. Dynamo's frame callback is thread-local and its compiles are serialised by its compile_lock;
graphs captured in another mode (train/eval) get their own background compile.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import warnings

import torch
from torch.utils import _pytree as pytree

from ..progress import is_quiet

_RNG_LOCK = threading.RLock()  # eager calls vs. the end of a background compile (see the module docstring)
_LOCAL = threading.local()  # .warming: this thread is a background compile; .rng: the states to put back
MAX_REWARMS = 2  # background compiles for new input shapes after the first (then Dynamo recompiles in place)
_LOCK_WAIT_S = 60.0  # a background compile never waits longer than this for the main thread's call to end

# torch.export and Dynamo both save, set and restore torch's process-wide is_compiling flag: a capture
# that overlapped a background compile could leave it set for good. Captures wait for this lock.
_SESSION = threading.Lock()
_IN_FLIGHT = [0]  # background compiles running now

# the backend that compiles a Dynamo graph; None: Inductor (tests inject others)
inner_backend = None


@contextlib.contextmanager
def no_background_compile():
    """Hold off background compiles (and wait for a running one) while the block runs (a capture)."""
    with _SESSION:
        yield


def tracing_here() -> bool:
    """torch.compiler.is_compiling(), for this thread. torch sets that flag process-wide for the whole
    of a compile, so while a graph compiles in the background it is True on the main thread too,
    where the module runs eager calls."""
    return torch.compiler.is_dynamo_compiling() or (
        torch.compiler.is_compiling() and not (_IN_FLIGHT[0] and not getattr(_LOCAL, "warming", False)
                                               and not torch.compiler.is_exporting()))


_ISOLATED: list = []  # the probe's answer, once per process


def unavailable() -> str | None:
    """Why lowering="auto" cannot run safely with this torch, or None.

    FX tracing patches `nn.Module.__call__` process-wide while it traces, and AOTAutograd traces with
    FX (make_fx, record_module_stack=True) on every compile: in a background compile, any module the
    training thread calls meanwhile enters that tracer and fails ("module is not installed as a
    submodule"; seen in benchmarks/auto_switch.py runs). pytorch/pytorch#187589 makes the patch
    thread-local; torch 2.13 does not have it. The probe traces a module on another thread and calls
    a module here while that trace runs. ADAPT_COMPILER_AUTO_UNSAFE=1 skips the refusal (measurements)."""
    if os.environ.get("ADAPT_COMPILER_AUTO_UNSAFE"):
        return None
    if not _ISOLATED:
        _ISOLATED.append(_fx_tracing_isolated())
    if _ISOLATED[0]:
        return None
    return (f"torch {torch.__version__} patches nn.Module.__call__ for every thread while FX traces (AOTAutograd "
            f"does, on every compile), so a compile in a background thread breaks the module calls of your training "
            f"loop; a torch with pytorch/pytorch#187589 (FX patches isolated per thread) is needed")


def _fx_tracing_isolated() -> bool:
    inside, done = threading.Event(), threading.Event()

    class Traced(torch.nn.Module):
        def forward(self, x):
            inside.set()
            done.wait(10)
            return x

    class Called(torch.nn.Module):
        def forward(self, x):
            return x

    tracer = threading.Thread(target=lambda: torch.fx.symbolic_trace(Traced()), daemon=True)
    tracer.start()
    try:
        if not inside.wait(10):
            return False
        try:
            return isinstance(Called()(torch.zeros(1)), torch.Tensor)  # the original __call__, not the tracer
        except Exception:  # noqa: BLE001 - the other thread's tracer took this call
            return False
    finally:
        done.set()
        tracer.join(10)


class _Compiled(Exception):
    """Raised instead of running the compiled graph in the compiling thread: the compile is done."""


class AutoCompileWarning(UserWarning):
    """lowering="auto" could not compile a graph in the background; it keeps running eager."""


def compile_whole(gm, options: dict | None):
    """The whole-graph Inductor lowering through a backend that compiles without running when called
    from a background compile. Unlike "inductor" (lowering/dynamic.py) it starts static
    (`dynamic=None`): a new shape runs eager while Dynamo recompiles it, dynamic, in the background."""
    # torch.compile(gm, options=...)'s own Inductor backend
    inner = inner_backend or torch._TorchCompileInductorWrapper(None, options or None, None)
    return torch.compile(gm, backend=_warmable(inner), dynamic=None)


def _warmable(inner):
    def backend(graph, example_inputs):
        if not getattr(_LOCAL, "warming", False):
            return inner(graph, example_inputs)
        from torch._functorch import config as functorch_config

        # the backward compiles now too; without donated buffers, as a backward compiled lazily under
        # the guard's retain_graph=True is (a donated buffer is freed by the first backward)
        with functorch_config.patch(force_non_lazy_backward_lowering=True, donated_buffer=False):
            compiled = inner(graph, example_inputs)
        _hold_rng()
        return _skipped_when_warming(compiled)

    backend.__name__ = f"auto({getattr(inner, '__name__', 'inductor')})"
    return backend


def _hold_rng() -> None:
    """Called in the compiling thread once the backend is done: keep eager calls out and note the RNG
    states the main thread has reached, so they can be put back after Dynamo restores its own."""
    if getattr(_LOCAL, "rng", None) is not None:
        return
    held = _RNG_LOCK.acquire(timeout=_LOCK_WAIT_S)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    _LOCAL.rng = (held, torch.random.get_rng_state(), random.getstate(), cuda)


def _release_rng() -> None:
    state = getattr(_LOCAL, "rng", None)
    _LOCAL.rng = None
    if state is None:
        return
    held, cpu, py, cuda = state
    torch.random.set_rng_state(cpu)
    random.setstate(py)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if held:
        _RNG_LOCK.release()


def _skipped_when_warming(compiled):
    """`compiled`, raising `_Compiled` in a compiling thread. The arguments pass through as they come
    (a boxed function's one list, or the tensors), and the calling-convention mark is kept."""
    def run(*args):
        if getattr(_LOCAL, "warming", False):
            raise _Compiled
        return compiled(*args)

    if getattr(compiled, "_boxed_call", False):
        run._boxed_call = True
    return run


class EagerUntilCompiled:
    """The callable lowering="auto" returns (see the module docstring).

    `gm`: the graph (eager lowering); `compiled`: the lazily compiled module (compile_whole) that the
    background thread compiles; `served`: what serves calls once it is ready (`compiled` behind the
    correctness guard, or `compiled` itself with verify=False); `what`: the graph, for messages."""

    def __init__(self, gm, compiled, served, what: str, quiet: bool = False):
        self.gm, self.compiled, self.served, self.what, self.quiet = gm, compiled, served, what, quiet
        self.status = "not started"  # "compiling" | "compiled" | "failed: <why>"
        self.calls = self.eager_calls = self.compiled_calls = 0
        self.switched_at: int | None = None  # the (1-based) call that first ran the compiled graph
        self.compile_s: float | None = None
        self.recompile_s: float | None = None  # the latest background compile for new shapes
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._warmed: set = set()  # input shapes compiled in the background
        self.rewarms = 0  # background compiles after the first one (new input shapes)
        gm.meta["ac_auto"] = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.status == "compiled" and not self._covered(_shapes(args, kwargs)) and self.rewarms < MAX_REWARMS:
            # new input shapes: Dynamo would recompile them on this thread (its first compile specialised
            # on the first call's shapes); compile them in the background too (Dynamo then makes the
            # changed sizes dynamic, so later sizes reuse that graph) and stay eager meanwhile
            self.rewarms += 1
            self._start(args, kwargs)
        if self.status == "compiled":
            if self.switched_at is None:
                self.switched_at = self.calls
                _say(f"[green]✓[/green] {self.what}: compiled by Inductor in {self.compile_s:.1f} s; "
                     f"call {self.calls} onwards run it ({self.eager_calls} ran eager)", self.quiet)
            self.compiled_calls += 1
            if self.compiled_calls > 1:
                return self.served(*args, **kwargs)
            # the guard's check keeps the autograd graph (retain_graph=True); AOTAutograd refuses that
            # for a backward compiled up front unless donation is off at run time too: nothing is
            # donated in this one (see _warmable), so the refusal would be a false alarm
            from torch._functorch import config as functorch_config

            with functorch_config.patch(donated_buffer=False):
                return self.served(*args, **kwargs)
        if self._thread is None:
            self._start(args, kwargs)
        elif self.status.startswith("failed") and not self._warned:
            self._warned = True  # said on the caller's thread, where the training loop sees it
            _say(f"[red]✗[/red] {self.what}: the background compile failed after {self.compile_s:.1f} s; it stays "
                 f"on eager", self.quiet)
            warnings.warn(f"adapt_compiler: lowering='auto' could not compile {self.what} ({self.status[8:]}); it "
                          f"keeps running on the eager lowering. report() records it.", AutoCompileWarning,
                          stacklevel=3)
        self.eager_calls += 1
        with _RNG_LOCK:
            return self.gm(*args, **kwargs)

    def _covered(self, shapes: tuple) -> bool:
        """Whether a compiled graph serves these input shapes: they were compiled, or differ from compiled
        ones only in sizes that already varied between background compiles (Dynamo made those dynamic),
        and not to 0 or 1 (sizes Dynamo specialises on)."""
        if shapes in self._warmed:
            return True
        varied = _varied(self._warmed)
        for seen in self._warmed:
            diff = _differing(seen, shapes)
            if diff is not None and diff <= varied and all(shapes[i][d] > 1 for i, d in diff):
                return True
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background compile is done (compiled or failed); whether it is. The switch
        itself happens on the next call."""
        return self._thread is not None and self._ready.wait(timeout)

    def _start(self, args, kwargs) -> None:
        copies = pytree.tree_map(_input_copy, (args, kwargs))
        modes = _thread_modes()  # read here, entered there
        self._warmed.add(_shapes(args, kwargs))
        self.status = "compiling"
        self._ready.clear()
        again = " again, for new input shapes" if self.rewarms else ""
        _say(f"{self.what}: compiling with Inductor in the background{again}; calls run eager until it is ready",
             self.quiet)
        self._thread = threading.Thread(target=self._compile, args=(copies, modes),
                                        name="adapt_compiler-auto-compile", daemon=False)  # see the docstring
        self._thread.start()

    def _compile(self, copies, modes) -> None:
        args, kwargs = copies
        start = time.perf_counter()
        _LOCAL.warming, _LOCAL.rng = True, None
        why = None
        try:
            with _SESSION, contextlib.ExitStack() as stack:
                stack.callback(_IN_FLIGHT.__setitem__, 0, _IN_FLIGHT[0])
                _IN_FLIGHT[0] += 1
                for mode in _enter_modes(modes):
                    stack.enter_context(mode)
                self.compiled(*args, **kwargs)
            why = "Dynamo ran the graph without compiling it"  # no backend call: nothing compiled
        except _Compiled:
            pass
        except Exception as e:  # noqa: BLE001 - a failed compile must never reach the training loop
            why = _reason(e)
        finally:
            _LOCAL.warming = False
            _release_rng()
        self.compile_s = time.perf_counter() - start if not self.rewarms else self.compile_s
        if self.rewarms:
            self.recompile_s = time.perf_counter() - start
        self.status = "compiled" if why is None else f"failed: {why}"
        self._ready.set()

    def summary(self) -> str:
        """One line for report()."""
        running = self.recompile_s is None or self.status == "compiling"
        latest = "still running" if running else f"{self.recompile_s:.1f} s"
        again = f"; {self.rewarms} more background compile(s) for new input shapes, the latest {latest}" \
            if self.rewarms else ""
        if self.switched_at is not None and not self.status.startswith("failed"):
            return (f"eager for calls 1-{self.switched_at - 1} while Inductor compiled ({self.compile_s:.1f} s), "
                    f"compiled from call {self.switched_at} ({self.compiled_calls} calls so far){again}")
        if self.status == "compiled":
            return (f"compiled by Inductor in {self.compile_s:.1f} s; switches on the next call "
                    f"({self.eager_calls} ran eager)")
        if self.status.startswith("failed"):
            return f"background compile {self.status}; every call runs eager ({self.eager_calls} so far)"
        return f"{self.status}; {self.eager_calls} calls ran eager so far"


def _shapes(args, kwargs) -> tuple:
    return tuple(tuple(x.shape) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor))


def _differing(a: tuple, b: tuple) -> set | None:
    """(input, dim) positions where two shape tuples differ; None if their structure differs."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return None
    return {(i, d) for i, (x, y) in enumerate(zip(a, b)) for d, (p, q) in enumerate(zip(x, y)) if p != q}


def _varied(shapes: set) -> set:
    seen = list(shapes)
    return {pos for i, a in enumerate(seen) for b in seen[i + 1:] for pos in (_differing(a, b) or ())}


def _reason(e: BaseException) -> str:
    """One line: the exception, and the backend's own error that Dynamo wrapped (BackendCompilerFailed)."""
    inner = getattr(e, "inner_exception", None) or e.__cause__
    parts = [e] if inner is None else [e, inner]
    text = ": ".join(f"{type(x).__name__}" + (f" ({first})" if (first := _first_line(x)) else "") for x in parts)
    return text[:400]


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _input_copy(x):
    """A copy of an input tensor with its layout and requires_grad (Dynamo guards on them); values are
    copied so the main thread may change its tensors meanwhile."""
    if not isinstance(x, torch.Tensor):
        return x
    copy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    try:
        copy.copy_(x.detach())
    except RuntimeError:  # an expanded view (elements overlap): not run, only read; keep it
        copy = x.detach()
    return copy.requires_grad_(x.requires_grad) if x.requires_grad else copy


def _thread_modes() -> tuple:
    """This thread's grad mode, inference mode and autocast (device, dtype) pairs: thread-local in torch."""
    autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


def _enter_modes(modes: tuple) -> list:
    """Context managers that put a thread in `modes` (built in that thread: set_grad_enabled acts when made)."""
    grad, inference, autocast = modes
    return [torch.inference_mode(inference), torch.set_grad_enabled(grad),
            *(torch.autocast(device, dtype=dtype) for device, dtype in autocast)]


def _say(line: str, quiet: bool) -> None:
    """One progress line on stderr (silent when quiet, see progress.py)."""
    if is_quiet(quiet):
        return
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"adapt_compiler: {line}")
