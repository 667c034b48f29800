"""Whole-graph Inductor compiles that are dynamic from their first call, in exactly the dims the
capture left symbolic (batch and sequence), so a new batch size or length never compiles again.

Left to itself, torch.compile compiles a graph's first call for its exact shapes, compiles it again
(dynamic) at the second shape, and again for a dim that is then 0 or 1: a user whose batches vary
paid three to five compiles of one graph (issue 19: 40-57 s each). Here:

  * the captured graph's symbolic input dims (capture.py marks batch and sequence `Dim.AUTO`) are
    marked dynamic on the first call, so the first compile is the dynamic one;
  * Dynamo and Inductor trace under size-oblivious reasoning (symbols range over [0, inf) and the
    general branch is taken without guarding `s != 1`), and AOTAutograd's backward keeps the
    traced strides of saved activations instead of pinning the sequence length to the first
    call's (`keep_saved_strides_inner_compile`);
  * sizes 1 are specialised ON PURPOSE: torch.export made the captured graph for sizes >= 2 (its
    range constraints say so) and a few facts the compile relies on hold only for >= 2 (the
    autograd engine's contiguity checks, a reshape of an expanded GQA key that is a view only at
    size 1). A call with a batch of one or a one-token sequence therefore compiles one more graph
    specialised to that 1 (at most one per such dim combination) rather than running code
    compiled under an assumption it breaks.

A graph with no symbolic input (a decode step over a static KV cache at batch 1, lowering/step.py)
is compiled for its shapes."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree


def compile_whole(gm: fx.GraphModule, options: dict | None):
    dims = symbolic_input_dims(gm)
    if not any(dims):
        return torch.compile(gm, dynamic=False, options=options or None)
    return DynamicFromFirstCall(torch.compile(gm, backend=_size_oblivious_inductor(options), dynamic=None), dims)


def canonical_size(size):
    """A symbolic size as its shape env now writes it: the symbol after every replacement export's
    guards made (a number where one fixed it, e.g. a decode step's batch equal to the static cache's;
    one representative where two dims were found equal)."""
    return size.node.shape_env.replace(size.node.expr)


def symbolic_input_dims(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Per placeholder (the call's flat leaves, in order): the dims the capture left symbolic."""
    dims = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = val.shape if isinstance(val, torch.Tensor) else ()
            dims.append(tuple(d for d, size in enumerate(shape) if isinstance(size, torch.SymInt)))
    return dims


class DynamicFromFirstCall:
    """Runs the compiled graph under size-oblivious reasoning (Dynamo traces and Inductor compiles
    on a call, the first and any size-1 specialisation), marking the symbolic dims of the first
    call's inputs so the first compile is already dynamic in them."""

    def __init__(self, compiled, dims: list[tuple[int, ...]]):
        self.compiled = compiled
        self.dims = dims
        self.marked = False

    def __call__(self, *args, **kwargs):
        if not self.marked:
            for x, dims in zip(pytree.tree_leaves((args, kwargs)), self.dims):
                for d in dims:
                    torch._dynamo.maybe_mark_dynamic(x, d)
        with fx_config.patch(backed_size_oblivious=True):
            out = self.compiled(*args, **kwargs)
        self.marked = True
        return out

    def shape_class(self, args, kwargs) -> tuple[int, ...]:
        """Which compiled graph serves a call: per symbolic dim, its size if 0 or 1, else 2 (any size
        >= 2 shares the first compile). The guard checks the first call of each class."""
        leaves = pytree.tree_leaves((args, kwargs))
        return tuple(min(int(x.shape[d]), 2) for x, dims in zip(leaves, self.dims) for d in dims)


def _size_oblivious_inductor(options: dict | None):
    """Inductor (what torch.compile's default backend runs) with `keep_saved_strides_inner_compile`."""

    def backend(graph, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        # no donated buffers: with dynamic shapes AOTAutograd compiles the backward with the forward,
        # not at the first backward, and a backward with donated buffers refuses retain_graph=True
        # (the guard's check of the first call, a user's double backward). A static graph's lazily
        # compiled backward loses them the same way when its first backward retains the graph.
        with torch._functorch.config.patch(donated_buffer=False):
            compiled = compile_fx(graph, example_inputs, inner_compile=keep_saved_strides_inner_compile,
                                  config_patches=options or None)
        say_no_buffers_donated()
        return compiled

    return backend


def say_no_buffers_donated() -> None:
    """torch 2.13 leaves `bw_donated_idxs` None ("unknown") when donation is off at compile time,
    and its backward (donation on by default at run time) then refuses retain_graph=True as if
    buffers were donated: say "none were" on the metadata of the graph just compiled."""
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None)
    if meta is not None and meta.bw_donated_idxs is None:
        meta.bw_donated_idxs = []


def keep_saved_strides_inner_compile(gm, example_inputs, **kwargs):
    """compile_fx_inner for size-oblivious dynamic training graphs.

    After the forward is lowered, Inductor reports its output strides to AOTAutograd as *ints*
    (size hints), and AOTAutograd re-strides each saved-activation placeholder of the backward when
    `guard_or_true(symbolic_stride != int_stride)` holds. Under backed_size_oblivious that test cannot
    be decided (`256*s != 16384` is "maybe"), so every saved activation would get concrete strides and
    the backward would pin the sequence length (`Eq(16384, 256*s)`). So: size-oblivious while
    tracing and lowering each graph, plain (hint-evaluating) reasoning in between, where the
    re-stride test runs (with dynamic shapes AOTAutograd lowers the backward right after the
    forward, inside the caller's compile_fx). Forward outputs are all marked user-visible so
    Inductor keeps the traced strides of saved activations (as invoke_subgraph_inductor_compile
    does)."""
    from torch._inductor.compile_fx import compile_fx_inner

    backward = kwargs.get("is_backward", False)
    if not backward:
        out = next(iter(gm.graph.find_nodes(op="output")))
        outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else out.args
        out.meta["user_visible_output_idxs"] = [i for i, a in enumerate(outs) if isinstance(a, fx.Node)]
    before = fx_config.backed_size_oblivious
    fx_config.backed_size_oblivious = True
    try:
        return compile_fx_inner(gm, example_inputs, **kwargs)
    finally:
        # after the forward: plain reasoning for AOTAutograd's re-stride test (see above); the
        # caller's patch() scope puts the setting back when compile_fx returns
        fx_config.backed_size_oblivious = before if backward else False
