"""Known compiler bugs, worked around narrowly in the graphs we hand to Inductor.

Each workaround applies only when the installed torch has the bug and the graph has the pattern
that triggers it. It rewrites a copy of the graph that only the compiler sees, with exact
rewrites: the eager graph (the guard's reference, lowering/guard.py) is left as captured. Every
rewritten node carries `meta["ac_workaround"]`, and the graph's `meta["ac_workarounds"]` lists
what was done; `report()` shows both.

Inductor's C++ backend loses a scatter's mutation (torch 2.13; pytorch/pytorch#185509, fixed
upstream by PR #185873). `SchedulerNode.recompute_size_and_body` re-reads a node's dependencies
and re-applies `mutation_renames` only when the node also has fake deps. The C++ backend calls it
when it fuses a flat pointwise node with an N-D one of equal numel. A reader of a buffer that an
`index_put(..., accumulate=True)` has just written then depends on the unwritten buffer, and may
run before the scatter: it reads zeros. In a diffusers UNet the scatter is the backward of
`F.interpolate(mode="nearest")`, and everything upstream of the upsampler trains with zero or
wrong gradients. Minimal reproduction: docs/upstream/inductor_scatter_reorder.md.

Workaround: nearest upsampling by an integer factor is rewritten as
unsqueeze → expand → clone → flatten. The values are bit-identical, and the backward of expand is
a sum reduction, not a scatter, so the lost dependency cannot arise. We do not monkeypatch
Inductor: that would change every torch.compile in the user's process. Other scatters that may
meet the same bug (embedding, max-pool backward) are left to the guard, which checks every
compiled graph's first call against eager.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import fx

aten = torch.ops.aten

# nearest upsampling op -> number of spatial dims
_UPSAMPLE_NEAREST = {
    aten.upsample_nearest1d.vec: 1,
    aten.upsample_nearest2d.vec: 2,
    aten.upsample_nearest3d.vec: 3,
    aten.upsample_nearest1d.default: 1,
    aten.upsample_nearest2d.default: 2,
    aten.upsample_nearest3d.default: 3,
}
SCATTER_REORDER = "inductor scatter reorder (pytorch#185509): nearest upsample -> expand"


@functools.cache
def has_scatter_reorder_bug() -> bool:
    """Whether this torch's Inductor re-applies mutation renames only under `if fake_deps:`."""
    from torch._inductor.scheduler import SchedulerNode

    try:
        src = inspect.getsource(SchedulerNode.recompute_size_and_body)
    except (OSError, TypeError):  # no source (frozen install): assume fixed, the guard still checks
        return False
    return "if fake_deps:" in src and "mutation_renames" in src and "or self.mutation_renames" not in src


def _integer_factors(node: fx.Node, ndim: int) -> list[int] | None:
    """Per spatial dim, the integer factor of a nearest upsample that is a pure repeat, else None."""
    val, x = node.meta.get("val"), node.args[0]
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or x_val is None:
        return None
    sizes_in, sizes_out = list(x_val.shape[-ndim:]), list(val.shape[-ndim:])
    if not all(isinstance(s, int) for s in [*sizes_in, *sizes_out]):
        return None  # symbolic spatial sizes: leave it to the guard
    scales = node.args[2] if node.target in (aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec,
                                             aten.upsample_nearest3d.vec) and len(node.args) > 2 else None
    factors = []
    for d, (i, o) in enumerate(zip(sizes_in, sizes_out)):
        if i <= 0 or o % i:
            return None
        if scales is not None and scales[d] is not None and float(scales[d]) != o // i:
            return None  # an explicit non-integer scale indexes differently
        factors.append(o // i)
    return factors


def rewrite_upsample_nearest(gm: fx.GraphModule) -> int:
    """x (…, H, W) -> x[…, :, None, :, None].expand(…, H, fh, W, fw) -> (…, H·fh, W·fw), in place.

    Nearest upsampling by integer factors reads source index dst // f, which is what the repeat
    does; leading dims (batch, channels) may be symbolic. Returns the number of nodes rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _UPSAMPLE_NEAREST:
            continue
        ndim = _UPSAMPLE_NEAREST[node.target]
        factors = _integer_factors(node, ndim)
        if factors is None:
            continue
        x = node.args[0]
        rank = x.meta["val"].dim()
        first = rank - ndim  # the first spatial dim
        with gm.graph.inserting_before(node):
            cur = x
            for d in reversed(range(ndim)):  # a singleton after each spatial dim, from the back
                cur = gm.graph.call_function(aten.unsqueeze.default, (cur, first + d + 1))
            sizes = [-1] * first
            for f in factors:
                sizes += [-1, f]
            cur = gm.graph.call_function(aten.expand.default, (cur, sizes))
            cur = gm.graph.call_function(aten.clone.default, (cur,), {"memory_format": torch.contiguous_format})
            for d in reversed(range(ndim)):  # merge each (size, factor) pair
                cur = gm.graph.call_function(aten.flatten.using_ints, (cur, first + 2 * d, first + 2 * d + 1))
        cur.meta = {**node.meta, "ac_workaround": SCATTER_REORDER}
        node.replace_all_uses_with(cur)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph Inductor should compile: `gm` itself, or a rewritten copy (see the module
    docstring); `gm.meta["ac_workarounds"]` lists what was rewritten."""
    gm.meta["ac_workarounds"] = []
    if not has_scatter_reorder_bug() or not any(n.target in _UPSAMPLE_NEAREST for n in gm.graph.nodes):
        return gm
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(gm.meta)
    n = rewrite_upsample_nearest(copied)
    if n:
        gm.meta["ac_workarounds"] = [f"{SCATTER_REORDER} ×{n}"]
        return copied
    return gm
