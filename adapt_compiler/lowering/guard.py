"""The correctness guard: the first call of every compiled graph is checked against the eager graph.

Compilers have bugs (Inductor on CPU in torch 2.13 trains a diffusers UNet with wrong gradients,
docs/upstream/), and our users must not inherit them silently. `guard(gm, compiled, ...)` wraps a
lowered graph. Its first call runs the uncompiled FX graph (the reference) and the compiled one on
the same inputs, from the same RNG state and buffer values (then, in training, the chosen one runs
once more from that state for the user, so the user's backward is the first through its graph: `_run`):

* with gradients (a training step): every floating output is contracted with a fixed random
  cotangent, and the gradients of that scalar with respect to every trainable adapter tensor are
  compared. This checks the forward and the backward the user's loss will run through, whatever
  the loss is, without touching `.grad`.
* without gradients (eval, inference): the outputs are compared.

"First call" means the first call of each compiled specialisation: a whole-graph compile that is
dynamic in batch and sequence (lowering/dynamic.py) compiles one more graph the first time a
dynamic dim is 0 or 1, so such a compiled callable tells the guard the call's `shape_class`, and the
first call of every class is checked as the very first call is.

Tolerances scale with the dtype of each tensor (`TOLERANCE`), and are never finer than that of the
least precise dtype the graph holds (`coarsest_tolerance`). If the two agree, the compiled graph
serves this call (run again for the user, see above) and every later call. If
they do not, a `CompilerMismatchWarning` names the graph, the tensors that differ and by how much;
the graph falls back to the next lowering in `fallbacks` that passes the same check (eager always
does: it is the reference), and `report()` says so. Cost: one extra eager forward (and backward, in
training) per new graph, and in training one more forward of the chosen lowering (`_run`);
`ac.compile(..., verify=False)` turns it off. After each checked first call, the memory the compile and the
check freed is handed back to the system (`return_freed_memory`: a full collection and glibc's malloc_trim).

A warm start (compile_cache.py) may skip the eager reference: `reuse` holds the verdicts saved with a
compile cache whose key matched this module (torch, adapt_compiler's code, spec, options, model,
machine and vector ISA). A saved "passed" verdict serves this graph only if (1) the graph's
`fingerprint` (its code, its inputs' and tensors' metadata, the lowering and its options) equals the
one the verdict was recorded for, and (2) every Inductor compile of this first call was served from
the FX-graph/AOTAutograd caches (hits, no miss and no bypass): then the code that runs is the code
that was compiled and checked when the cache was saved, on the same graph, and this first call is,
for the guard, what that process's second call was. Otherwise (a miss: Inductor compiled something
anew) the candidate's outputs are dropped, the state is restored and the full check runs. The
reasoning, and what it does not cover, is in docs/GUARANTEES.md.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from . import half_gemm

# relative tolerance per dtype: Inductor reorders reductions and fuses kernels (float32 drifts by
# ~1e-6 relative on CPU, by ~1e-3 with TF32 convolutions on CUDA); a miscompile is off by O(1)
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}
CUDA_FLOAT32 = 2e-2


class CompilerMismatchWarning(UserWarning):
    """A compiled graph disagreed with the eager graph on its first call; the graph was switched."""


@dataclass
class Verdict:
    """What the guard found on a graph's first call (report() shows it)."""

    status: str  # "passed" | "mismatch" | "not checked: <why>"
    lowering: str  # what serves the graph now
    compared: int = 0  # tensors compared
    worst: float = 0.0  # largest error relative to its tensor's scale
    mismatches: list = field(default_factory=list)  # (what, |Δ| max, scale) of each tensor that differs
    source: str | None = None  # status "reused": the compile cache directory the verdict came from
    note: str | None = None  # why a saved verdict was not reused (the check ran)
    shape_classes: int = 1  # compiled specialisations checked (see the module docstring)


def _tolerance(t: torch.Tensor, coarsest: float = 0.0) -> float:
    """`t`'s dtype's tolerance, at least `coarsest` (that of the least precise dtype the graph computes in)."""
    if t.dtype == torch.float32 and t.is_cuda:
        return max(CUDA_FLOAT32, coarsest)
    return max(TOLERANCE.get(t.dtype, 2e-3), coarsest)


def coarsest_tolerance(gm) -> float:
    """The largest TOLERANCE among the float dtypes of `gm`'s tensors (its attributes and inputs): a
    float32 adapter gradient over a bfloat16 base is computed from bfloat16 activations, and Inductor
    rounds them at other points than eager does (it computes bf16 pointwise ops in float32), so it
    differs from eager's by bf16's error, not float32's (seen: 1 % on a 2-layer bf16 Llama)."""
    return max((TOLERANCE.get(v.dtype, 0.0) for v in half_gemm.graph_tensors(gm) if isinstance(v, torch.Tensor)),
               default=0.0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library: nothing to call)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS), or no dlopen(NULL) (Windows)
        return None


def return_freed_memory() -> None:
    """After a graph's first call: give the memory that the compile and the check freed back to the system.

    A first call compiles (Dynamo, AOTAutograd, Inductor) and runs the eager reference (forward and
    backward, in training) besides the compiled graph. Their objects are garbage now, but (1) the
    compile's sit in reference cycles until a full collection, and (2) glibc keeps freed heap memory in
    the process: its mmap threshold rises as large tensors are freed, so later ones come from the heap,
    and the heap is only returned from its top. Without this, the process keeps the first call's
    high-water mark as resident memory between steps (at the issue-18 size, see
    benchmarks/memory_budget.py). Costs one full collection and one trim per compiled specialisation."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class TrimAfterFirstStep:
    """`verify=False`: no check, but the first call of each compiled specialisation still leaves the
    compile's garbage, and in training the backward is compiled after that call returns (at the
    user's `loss.backward()`). So on the second call of each specialisation, after the first step
    is done, the freed memory is returned once, as the guard does after its check."""

    def __init__(self, fn):
        self.fn = fn
        self.shape_class = getattr(fn, "shape_class", None)
        self.calls: dict = {}

    def __call__(self, *args, **kwargs):
        key = self.shape_class(args, kwargs) if self.shape_class is not None else None
        seen = self.calls.get(key, 0)
        if seen < 2:
            self.calls[key] = seen + 1
            if seen == 1:
                return_freed_memory()
        return self.fn(*args, **kwargs)


def _float_leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _cotangent(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float32).to(device=t.device)


def _scalar(leaves: list[torch.Tensor]) -> torch.Tensor | None:
    """Σ ⟨leaf, c_leaf⟩ over the outputs that require grad, with fixed random cotangents c."""
    terms = [(t.float() * _cotangent(t, i)).sum() for i, t in enumerate(leaves) if t.requires_grad]
    return torch.stack(terms).sum() if terms else None


def _compare(named_pairs, coarsest: float = 0.0) -> tuple[float, list]:
    """(worst relative error, mismatches) over (what, candidate, reference) triples; `coarsest`: the
    graph's coarsest_tolerance."""
    worst, bad = 0.0, []
    refs = [r for _, _, r in named_pairs if r is not None]
    floor = max((float(r.detach().abs().max()) for r in refs if r.numel()), default=0.0) * 1e-3
    for what, cand, ref in named_pairs:
        if cand is None and ref is None:
            continue
        if cand is None or ref is None or cand.shape != ref.shape:
            bad.append((what, math.inf, 0.0))
            worst = math.inf
            continue
        if not ref.numel():
            continue
        diff = float((cand.detach().double() - ref.detach().double()).abs().max())
        scale = max(float(ref.detach().abs().max()), floor, 1e-12)
        if not math.isfinite(diff):
            diff = math.inf
        rel = diff / scale
        worst = max(worst, rel)
        if rel > _tolerance(ref, coarsest):
            bad.append((what, diff, scale))
    return worst, bad


class _State:
    """The tensors a call may change in place (buffers such as BatchNorm statistics, inputs such as
    a KV cache), the RNG: saved before the reference runs and put back before the candidate."""

    def __init__(self, buffers: list[torch.Tensor], args, kwargs):
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # a tensor whose elements share memory (an expand()ed position_ids) cannot be written in place
        self.tensors = [t for t in [*buffers, *inputs]
                        if not t.requires_grad and torch._debug_has_internal_overlap(t) != 1]
        self.saved = [t.detach().clone() for t in self.tensors]
        self.rng = torch.random.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @torch.no_grad()
    def restore(self) -> None:
        for t, s in zip(self.tensors, self.saved):
            t.copy_(s)
        torch.random.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _run(fn, args, kwargs, params, grads: bool):
    """(outputs, [gradient per param] or None) of one call. With `grads`, the check's backward consumes
    the call's autograd graph (not retained): the caller runs the call again for the user (`_again`).

    Why not retain it and hand these outputs to the user: a compiled backward may reuse the buffers it
    saved from the forward in place ("donated buffers"). Our compiles turn donation off, but Inductor's
    FX-graph cache key does not cover it (torch 2.13), so a backward compiled elsewhere with donation
    can be served from the cache; its first backward is right, and a second backward through the same
    graph (the user's, after the check's) reads overwritten buffers and gives wrong gradients with no
    error (seen: tests/test_regional.py over a shared Inductor cache dir, adapter grads off by up to 7 %)."""
    out = fn(*args, **kwargs)
    if not grads:
        return out, None
    scalar = _scalar(_float_leaves(out))
    if scalar is None:
        return out, None
    # every graph we compile has buffer donation off (lowering/dynamic.py), but a backward loaded from
    # AOTAutograd's cache does not say so, and torch then refuses it as if it had (seen in a fresh
    # process over a cache entry compiled elsewhere, even without retain_graph)
    with torch._functorch.config.patch(donated_buffer=False):
        got = torch.autograd.grad(scalar, params, allow_unused=True)
    return out, list(got)


def _again(fn, args, kwargs, state: "_State"):
    """The call once more from the saved state (buffers, inputs updated in place, RNG), for the user: its
    autograd graph has had no backward yet (see `_run`)."""
    state.restore()
    return fn(*args, **kwargs)


def fingerprint(gm, lowering: str, options: dict | None) -> str:
    """What a saved verdict must have been recorded for (sha256, 32 hex digits): the graph's code
    (every op, every slot call, the plan's kwargs), its inputs' metadata (shapes with export's
    symbols, dtypes, strides, devices), the metadata of every tensor it holds (frozen base, adapter
    tensors, requires_grad included), its variant and mode, the lowering and its options."""
    h = hashlib.sha256(gm.code.encode())

    def meta(v):
        if isinstance(v, torch.Tensor):
            return (tuple(str(s) for s in v.shape), tuple(str(s) for s in v.stride()), str(v.dtype), str(v.device),
                    v.requires_grad)
        return type(v).__name__ if v is None or isinstance(v, (int, float, bool, str)) else repr(type(v))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            h.update(repr((node.target, meta(node.meta.get("val")))).encode())
    for name, t in itertools.chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)):
        h.update(repr((name, meta(t))).encode())
    h.update(repr((lowering, sorted((options or {}).items()), gm.meta.get("ac_variant"),
                   gm.meta.get("ac_training"))).encode())
    return h.hexdigest()[:32]


# Inductor compiles that did not come from a cache: any of these in a first call means the code that runs
# is new, and a saved verdict does not apply to it
_FRESH = (("inductor", "fxgraph_cache_miss"), ("inductor", "fxgraph_cache_bypass"),
          ("aot_autograd", "autograd_cache_miss"))
_HITS = (("inductor", "fxgraph_cache_hit"), ("aot_autograd", "autograd_cache_hit"))


def _cache_counts() -> tuple[int, int]:
    """(compiles not served from a cache, cache hits) so far in this process (torch's counters)."""
    from torch._dynamo.utils import counters

    return (sum(counters[a][b] for a, b in _FRESH), sum(counters[a][b] for a, b in _HITS))


class GuardedGraph:
    """A lowered graph whose first call is checked (see the module docstring)."""

    def __init__(self, gm, compiled, lowering: str, tensors, buffers, fallbacks, what: str, reuse=None,
                 options: dict | None = None):
        self.gm, self.fn, self.lowering = gm, compiled, lowering
        self.tensors = tensors  # () -> [(label, parameter)]: the trainable adapter tensors
        self.buffers = buffers  # () -> [buffer]: base tensors a call may update in place
        self.fallbacks = list(fallbacks)  # [(name, () -> callable)], tried in order; eager is last
        self.what = what
        self.verdict: Verdict | None = None
        # () -> hashable: which compiled specialisation a call runs (None: one for every call)
        self.shape_class = getattr(compiled, "shape_class", None)
        self.checked_classes: set = set()
        gm.meta["ac_guard"] = None
        # what a saved verdict is matched on, kept on the graph so that save_adapter can record this one
        gm.meta["ac_guard_fingerprint"] = fingerprint(gm, lowering, options)
        saved = (reuse or {}).get(gm.meta["ac_guard_fingerprint"])
        self.reuse = saved if isinstance(saved, dict) and saved.get("status") == "passed" else None

    def __call__(self, *args, **kwargs):
        key = self.shape_class(args, kwargs) if self.shape_class is not None else None
        if key in self.checked_classes:
            return self.fn(*args, **kwargs)
        out = self._first_call(args, kwargs)
        self.checked_classes.add(key)
        return_freed_memory()  # the check's reference run and the compile's objects are unreferenced now
        return out

    def _reused_call(self, args, kwargs, params, grads, state):
        """The first call on a saved verdict: (outputs, None), or (None, why not) after the state is restored."""
        fresh, hits = _cache_counts()
        out, got = _run(self.fn, args, kwargs, params, grads)  # with grads: the backward is loaded (and counted) too
        fresh_now, hits_now = _cache_counts()
        if fresh_now == fresh and hits_now > hits:
            return (out if got is None else _again(self.fn, args, kwargs, state)), None
        del out
        state.restore()
        why = ("Inductor compiled this graph anew (a cache miss)" if fresh_now != fresh
               else "nothing of this graph came from the compile cache")
        return None, f"verdict saved in {self.reuse.get('source')} not reused: {why}; checked against eager"

    def _first_call(self, args, kwargs):
        labelled = [(label, p) for label, p in self.tensors() if p.requires_grad]
        grads = torch.is_grad_enabled() and bool(labelled)
        params = [p for _, p in labelled]
        state = _State(self.buffers(), args, kwargs)
        note = None
        if self.reuse is not None and self.verdict is None:  # a saved verdict is for the graph's first call
            out, note = self._reused_call(args, kwargs, params, grads, state)
            if note is None:
                self._record(Verdict("reused", self.lowering, int(self.reuse.get("compared", 0)),
                                     float(self.reuse.get("worst", 0.0)), source=self.reuse.get("source")))
                return out
        with half_gemm.reference_products(self.gm):  # the compiled graph's layouts, not its slow BLAS path
            ref_out, ref_grads = _run(self.gm, args, kwargs, params, grads)
        ref = _float_leaves(ref_out)
        ref_grads = [g.detach() if g is not None else None for g in ref_grads] if ref_grads is not None else None
        # outputs that alias a mutated input (a static KV cache updated in place) are copied: the
        # candidate's run overwrites them, and the check would compare them with themselves
        mutable = {t.untyped_storage().data_ptr() for t in state.tensors}
        ref = [t.detach().clone() if t.untyped_storage().data_ptr() in mutable else t.detach() for t in ref]
        del ref_out  # the reference's autograd graph: freed before the candidate runs
        candidates = [(self.lowering, self.fn), *self.fallbacks]
        tolerance = coarsest_tolerance(self.gm)
        first_bad = None
        for i, (name, fn) in enumerate(candidates):
            if i:
                fn = fn()  # build the fallback only when needed
            state.restore()
            out, got = _run(fn, args, kwargs, params, grads)
            pairs = [(f"output {j}", o, r) for j, (o, r) in enumerate(zip(_float_leaves(out), ref))]
            if len(_float_leaves(out)) != len(ref):
                pairs.append(("outputs", None, torch.zeros(1)))
            if ref_grads is not None:
                pairs += [(f"grad {label}", g, r) for (label, _), g, r in zip(labelled, got or [None] * len(params),
                                                                          ref_grads)]
            worst, bad = _compare(pairs, tolerance)
            if not bad:
                self.fn, self.lowering = fn, name
                self._record(Verdict("passed" if i == 0 else "mismatch", name, len(pairs), worst,
                                     first_bad[1] if first_bad else [], note=note))
                if first_bad:
                    self._warn(first_bad[0], first_bad[1], name)
                return out if got is None else _again(fn, args, kwargs, state)
            if first_bad is None:
                first_bad = (name, bad)
        raise AssertionError("the eager fallback disagreed with the eager reference")  # eager is the reference

    def _record(self, verdict: Verdict) -> None:
        """Keep the verdict that matters most across shape classes: the first mismatch over a pass."""
        before = self.verdict
        if before is not None:
            classes = before.shape_classes + 1
            if verdict.status == "mismatch" and before.status != "mismatch":
                verdict.shape_classes = classes
            else:
                if verdict.status != "mismatch":
                    before.worst = max(before.worst, verdict.worst)
                before.shape_classes = classes
                verdict = before
        self.verdict = verdict
        self.gm.meta["ac_guard"] = verdict

    def _warn(self, failed: str, bad: list, now: str) -> None:
        shown = "; ".join(f"{what}: max |Δ| {diff:.3g} ({'∞' if not scale else f'{diff / scale:.0%}'} of its scale)"
                          for what, diff, scale in bad[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        warnings.warn(
            f"adapt_compiler: the {failed} lowering of {self.what} disagrees with the eager graph on its first call "
            f"{'' if self.verdict.shape_classes == 1 else 'at a new shape class '}"
            f"({len(bad)} tensors differ: {shown}{more}). This graph now runs on the {now} lowering; report() "
            f"records it. This is a compiler bug, not your model; pass verify=False to skip the check.",
            CompilerMismatchWarning,
            stacklevel=4,
        )


def guard(gm, compiled, lowering: str, tensors, buffers, fallbacks, what: str, reuse=None,
          options: dict | None = None) -> GuardedGraph:
    """Wrap a lowered graph so its first call is verified (see the module docstring). `reuse`: fingerprint ->
    verdict saved with a compile cache whose key matched; `options`: the compile options (fingerprinted)."""
    return GuardedGraph(gm, compiled, lowering, tensors, buffers, fallbacks, what, reuse, options)
