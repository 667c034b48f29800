"""One block of the regional lowering compiled WITHOUT Dynamo: AOTAutograd + Inductor
(`compile_fx`) straight on the captured ATen graph, with our own symbolic fake inputs.

Why no Dynamo: the block is already an ATen graph (torch.export made it), so Dynamo's trace, its
guards and its recompiles buy nothing. We create a fresh ShapeEnv under size-oblivious reasoning,
one symbol per symbol export gave the batch/sequence dims (`do_not_specialize_zero_one`, hints from
the first call), and compile once per requires_grad pattern (train step vs no_grad). Nothing is
re-compiled for a new batch size or sequence length, sizes 1 included.

What the compile assumed (the ShapeEnv's guards) is split into
  * `assumptions`: ">= 2" facts, true for every size >= 2 (they come from 0/1 reasoning that is not
    size-oblivious, e.g. the autograd engine's C++ contiguity check); they steer layout only and
    the code is correct at size 1 (tests/test_regional.py checks sizes 1 against eager);
  * `relations`: equalities between sizes (e.g. labels.numel == batch * seq), checked on every
    call: a violation raises instead of computing garbage.
"""

from __future__ import annotations

import copy
import re
import time

import torch
from torch import fx

from ..counters import COUNTERS
from ..errors import AdapterError
from .dynamic import canonical_size, keep_saved_strides_inner_compile, say_no_buffers_donated


class AOTRegion:
    """A representative compiled WITHOUT Dynamo: AOTAutograd + Inductor (`compile_fx`) straight on the
    captured ATen graph, with fresh symbolic fake inputs (one symbol per export symbol, size-oblivious
    ShapeEnv, hints from the first call). No Dynamo guards exist, so nothing recompiles on a new batch
    or sequence length; the ShapeEnv's guards (assumptions Inductor/AOTAutograd made) are split into
    `self.assumptions` (">= 2" facts from 0/1 reasoning) and `self.relations` (equalities between
    sizes, checked on every call unless check="off").
    One compile per requires_grad pattern of the call inputs (train vs no_grad)."""

    def __init__(self, gm: fx.GraphModule, name: str, force_grad: list[bool], check: str = "on", options=None):
        self.gm = gm
        self.name = name
        self.force_grad = force_grad
        self.check = check
        self.options = options or {}
        self.phs = [p for p in gm.graph.nodes if p.op == "placeholder"]
        self.compiled = {}  # requires_grad pattern -> [callable, ShapeEnv, symbol sources, guards seen, check]
        self.assumptions = []  # ">= 2" facts the compile used (sizes 1 are still served: tests/test_regional.py)
        self.relations = []  # relations between sizes, checked on every call
        self.calls = 0
        self.compile_s = 0.0

    def _fake_inputs(self, args):
        import sympy  # noqa: F401
        import torch.fx.experimental._config as fx_config
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        with fx_config.patch(backed_size_oblivious=True):
            shape_env = ShapeEnv()
        fake_mode = FakeTensorMode(shape_env=shape_env)
        new = {}  # export symbol -> new symbol
        where = {}  # new symbol -> (arg index, dim) to read it back at run time
        hints = {}

        def fresh(key, a, i, d):
            with fx_config.patch(backed_size_oblivious=True):
                ns = shape_env.create_symbol(int(a.shape[d]), ConstantSource(f"{self.name}_a{i}_d{d}"),
                                             dynamic_dim=DimDynamic.DYNAMIC, do_not_specialize_zero_one=True)
            new[key] = ns
            where[ns] = (i, d)
            hints[ns] = int(a.shape[d])

        # pass 1: one new symbol per export symbol that is a whole dim of some input
        for i, (p, a) in enumerate(zip(self.phs, args)):
            v = p.meta.get("val")
            if isinstance(v, torch.Tensor) and isinstance(a, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt):
                        e = canonical_size(size)
                        if isinstance(e, sympy.Symbol) and e not in new:
                            fresh(e, a, i, d)

        def conv(size, a, i, d):
            if not isinstance(size, torch.SymInt):
                return int(size)
            expr = canonical_size(size)
            if not expr.free_symbols <= set(new):
                # a dim only known as a product of symbols no input carries alone (e.g. labels
                # flattened to s97*s38): its own symbol; relations become checked assumptions
                if d is None:
                    raise NotImplementedError(f"{self.name}: input {i} stride {expr}")
                if expr not in new:
                    fresh(expr, a, i, d)
                e = new[expr]
            else:
                e = expr.xreplace(new)
            if isinstance(e, sympy.Symbol):
                return shape_env.create_symintnode(e, hint=hints[e])
            return shape_env.create_symintnode(e, hint=int(e.xreplace(hints)))

        fakes = []
        for i, (p, a) in enumerate(zip(self.phs, args)):
            v = p.meta.get("val")
            if not isinstance(a, torch.Tensor):
                fakes.append(a)
                continue
            sizes = [conv(sz, a, i, d) for d, sz in enumerate(v.shape)]
            strides = [conv(st, a, i, None) for st in v.stride()]
            with fake_mode:
                t = torch.empty_strided(sizes, strides, dtype=a.dtype, device=a.device)
            if a.requires_grad:
                t.requires_grad_(True)
            fakes.append(t)
        return fake_mode, fakes, where

    def _compile(self, args):
        from torch._inductor.compile_fx import compile_fx

        t = time.perf_counter()
        fake_mode, fakes, where = self._fake_inputs(args)
        gm = copy.deepcopy(self.gm)
        for p, f in zip([p for p in gm.graph.nodes if p.op == "placeholder"], fakes):
            p.meta["val"] = f
        import torch.fx.experimental._config as fx_config

        # size-oblivious while tracing (the forward and backward lowering: see keep_saved_strides_inner_compile)
        ctx = torch._guards.TracingContext(fake_mode)
        # no donated buffers: the guard (and a user) may run backward(retain_graph=True). The
        # AOTAutograd cache is off because a cache hit gives back metadata we cannot reach to say
        # so (below); Inductor's FX-graph cache still serves the compiled kernels on a warm start
        with torch._guards.tracing(ctx), fx_config.patch(backed_size_oblivious=True), \
                torch._functorch.config.patch(donated_buffer=False, enable_autograd_cache=False):
            fn = compile_fx(gm, fakes, inner_compile=keep_saved_strides_inner_compile,
                            config_patches=self.options or None)
            say_no_buffers_donated()
        self.compile_s += time.perf_counter() - t
        COUNTERS["regional_compiles"] += 1
        return [fn, fake_mode.shape_env, where, -1, None]

    def _split_guards(self, entry) -> None:
        """Split what the compile assumed (the ShapeEnv's guards; the lazily lowered backward adds
        some at the first backward, so this reruns when their number changes) into ">= 2" facts,
        true whenever every size is >= 2 (0/1 reasoning that is not size-oblivious, e.g. the autograd
        engine's C++ contiguity check; they steer layout only) and relations between sizes, which
        are checked on every call."""
        import sympy

        _, env, where, _, _ = entry
        guards = [g.expr for g in env.guards]
        syms = sorted(where, key=str)
        names = {str(sym): f"a{i}.size({d})" for sym, (i, d) in where.items()}

        def pretty(g):
            return re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), str(g))

        def only_01(g):
            for vals in ((2, 3, 5, 7, 11, 13), (3, 2, 7, 5, 13, 11), (64, 2, 300, 8, 9, 4), (2, 2, 2, 2, 2, 2)):
                sub = {sym: vals[k % len(vals)] for k, sym in enumerate(syms)}
                try:
                    if not bool(g.xreplace(sub)):
                        return False
                except TypeError:
                    return False
            return True

        relations = [g for g in guards if not only_01(g)]
        self.assumptions = [pretty(g) for g in guards if only_01(g)]
        self.relations = [pretty(g) for g in relations]
        check = None
        if relations:
            lam = sympy.lambdify(syms, sympy.And(*relations), "math")
            idx = [where[s] for s in syms]

            def check(args, _lam=lam, _idx=idx):
                return bool(_lam(*[args[i].shape[d] for i, d in _idx]))
        entry[3], entry[4] = len(guards), check

    def __call__(self, *args):
        self.calls += 1
        grad = torch.is_grad_enabled()
        if grad:
            args = tuple(a.detach().requires_grad_(True) if f and isinstance(a, torch.Tensor) and not a.requires_grad
                         else a for a, f in zip(args, self.force_grad))
        key = tuple(bool(grad and isinstance(a, torch.Tensor) and a.requires_grad) for a in args)
        entry = self.compiled.get(key)
        if entry is None:
            entry = self.compiled[key] = self._compile(args)
        fn, env, _, seen, check = entry
        if len(env.guards) != seen:
            self._split_guards(entry)
            check = entry[4]
        if check is not None and self.check != "off" and not check(args):
            sizes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:4]
            raise AdapterError(f"lowering='regional': {self.name} was compiled assuming {self.relations} between "
                               f"input sizes, and this call (sizes {sizes}) breaks it. Inputs whose sizes must "
                               f"agree (e.g. labels and input_ids) disagree; or use lowering='inductor'.")
        return fn(*args)
