"""One-row decode steps on CPU: matrix-vector products as fused reductions, not BLAS calls.

A decode step over a static KV cache (lowering/step.py) multiplies ONE row per sequence by every
weight matrix. At batch 1 each of those GEMMs is a matrix-vector product, bound by how fast the
weight streams from memory. MKL's GEMV does not stream it fast for short rows: on the benchmark
machine (AMD EPYC, one thread) a 1024x512 float32 weight is read at ~8 GB/s by `x @ W.t()` and at
~15 GB/s by Inductor's fused reduction `(x[:, :, None] * W.t()[None]).sum(-2)`; from K=1024 on the
two are about even (benchmarks/gemv.py). The standard config's layers are all K<=1024, and batch-1
decode spends most of its time in them, so the decode graph asks Inductor for that reduction:
its `decompose_mm_pass`, which rewrites an mm/addmm on CPU only when the left side has one row and
both weight dims are <= 2048 (Inductor's own thresholds). LoRA's two small products at one row
become reductions the same way and fuse with the add. Float32 sums in another order: the guard
(lowering/guard.py) checks the first call against the FX graph, as for every compiled graph.

A few rows (a decode step at batch 2..8) are no better served by BLAS here: MKL's small-M GEMM reads
the standard config's weights at 5-7 GB/s on the benchmark machine (an AMD EPYC). An Inductor reduction
whose outer loop runs over the weight's rows (each row read once for all activation rows) reads them at
13.5-16.6 GB/s for 2 rows and 5.6-10.2 GB/s for 8 (`python -m benchmarks.gemv --rows 2,8,16 --clock
wall`), and in the decode step it fuses with its neighbours. Inductor's decompose_mm_pass stops at one
row, so `FewRowProducts` (a post-grad pass, below) writes that reduction for 2..FEW_ROWS static rows,
under the same weight-size limit. An A/B of `python -m benchmarks.generate` (64 new tokens) read 605
tokens/s with it and 488 without at batch 8 (1.61x and 1.44x PEFT); at batch 16 it lost (0.87x against
0.96x of PEFT merged + compile), so FEW_ROWS is 8.

The decision is visible: the graph's `meta["ac_gemv"]` says how many of its linear layers see one
row or a few, and report() prints it. The passes fire only where the row count is statically known:
in a decode step, and in a prefill graph only for the LM head (HF computes the last position's logits).
Training graphs never get them.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..counters import COUNTERS
from ..names import SLOTS
from .dynamic import canonical_size

GEMV = "ac_gemv"
ONE_ROW = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
MAX_DIM = 2048  # Inductor's CPU limit for decompose_mm_pass (cpu_max_other_dimension_decomposition)
FEW_ROWS = 8  # the decode step gained at batch 8 and lost at 16 (module docstring)
aten = torch.ops.aten


# op -> (activation arg, weight arg); linear's weight is (out, in), addmm's (HF Conv1D) is (in, out)
_LINEAR_OPS = {torch.ops.aten.linear.default: (0, 1), torch.ops.aten.addmm.default: (1, 2)}


def _rows_and_dims(node: fx.Node, gm: fx.GraphModule):
    """(rows, out, in) of a CPU linear layer's product at this node (rows None: symbolic), or None if
    the node is not one."""
    if node.op == "call_module" and str(node.target).startswith(f"{SLOTS}."):
        layer = gm.get_submodule(node.target).layer
        if layer.kind != "linear" or layer.quant is not None:
            return None
        x, (out, inp) = node.args[0], (layer.out_features, layer.in_features)
    elif node.op == "call_function" and node.target in _LINEAR_OPS:
        x_at, w_at = _LINEAR_OPS[node.target]
        w = node.args[w_at].meta.get("val") if isinstance(node.args[w_at], fx.Node) else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        x, (out, inp) = node.args[x_at], (w.shape if node.target is torch.ops.aten.linear.default else w.shape[::-1])
    else:
        return None
    x = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not x.is_floating_point():
        return None
    dims = [_known(d) for d in x.shape[:-1]]
    return (math.prod(dims) if None not in dims else None), int(out), int(inp)


def _known(size) -> int | None:
    """A size's value if the capture fixed it (an int, or a symbol its shape env has since replaced by a
    number: a decode step's batch symbol equals the static cache's batch), else None."""
    if isinstance(size, int):
        return size
    try:
        value = canonical_size(size)
    except AttributeError:
        return None
    return int(value) if value.is_number else None


def decode_options(gm: fx.GraphModule) -> dict | None:
    """Inductor options for `gm` if it is a static eval graph with CPU linear layers of one row or a few
    that the reductions serve (see the module docstring), else None. Records the decision in gm.meta."""
    if gm.meta.get("ac_training"):
        return None
    layers = [r for r in (_rows_and_dims(n, gm) for n in gm.graph.nodes) if r is not None]
    small = [r for r in layers if r[0] is not None and r[1] <= MAX_DIM and r[2] <= MAX_DIM]
    one = [r for r in small if r[0] == 1]
    few = [r for r in small if 2 <= r[0] <= FEW_ROWS]
    if not (one or few):
        return None
    said = []
    if one:
        said.append(f"{len(one)} of {len(layers)} linear layers see one row: matrix-vector products as fused "
                    f"reductions (Inductor decompose_mm_pass; BLAS GEMV streams short rows slowly)")
    if few:
        rows = sorted({r[0] for r in few})
        said.append(f"{len(few)} of {len(layers)} linear layers see {'/'.join(map(str, rows))} rows: products as "
                    f"reductions over the weight's rows (FewRowProducts; BLAS streams few rows slowly)")
    gm.meta[GEMV] = "; ".join(said)
    return {**(ONE_ROW if one else {}), **({"post_grad_custom_post_pass": FewRowProducts()} if few else {})}


class FewRowProducts(CustomGraphPass):
    """Post-grad: `mm(x, W.t())` (and `addmm`) whose x has 2..FEW_ROWS static rows and whose weight dims
    are at most MAX_DIM, as `(W[:, None, :] * x[None]).sum(-1).t()`: the reduction's outer loop runs over
    the weight's rows, so each is read once for all of x's rows (x @ W.t() in Inductor's reduction
    order, m outermost, rereads the weight per row and was no faster than MKL). Float sums in another
    order; the guard checks the first call, as for every compiled graph."""

    def __call__(self, graph: fx.Graph) -> None:
        COUNTERS["few_row_products"] += sum(_rewrite_few_rows(graph, node) for node in list(graph.nodes))

    def uuid(self):
        return get_hash_for_files((__file__,))

    def __repr__(self):  # options are fingerprinted by repr (lowering/guard.py): no object address
        return "FewRowProducts()"


def _rewrite_few_rows(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.kwargs:
        return False
    if node.target is aten.mm.default and len(node.args) == 2:
        bias, (x, w_t) = None, node.args
    elif node.target is aten.addmm.default and len(node.args) == 3:  # beta/alpha given: left to BLAS
        bias, x, w_t = node.args
    else:
        return False
    xv, wv = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (x, w_t))
    if not all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.device.type == "cpu" and v.is_floating_point()
               for v in (xv, wv)):
        return False
    (rows, inner), (_, out) = xv.shape, wv.shape
    if not all(isinstance(d, int) for d in (rows, inner, out)):
        return False
    if not (2 <= rows <= FEW_ROWS and inner <= MAX_DIM and out <= MAX_DIM):
        return False
    with graph.inserting_before(node):
        w = graph.call_function(aten.permute.default, (w_t, [1, 0]))  # (out, in)
        # x stored before the reduction reads it: inlined, its producer (an RMSNorm, say) would be
        # recomputed for every weight row (4x slower than MKL, measured)
        x = graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (x, [inner, 1]))
        terms = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.unsqueeze.default, (w, 1)),
                                                      graph.call_function(aten.unsqueeze.default, (x, 0))))
        summed = graph.call_function(aten.sum.dim_IntList, (terms, [2]))  # (out, rows): weight rows outermost
        result = graph.call_function(aten.clone.default, (graph.call_function(aten.permute.default, (summed, [1, 0])),),
                                     {"memory_format": torch.contiguous_format})  # mm's layout for the views after it
        if bias is not None:
            result = graph.call_function(aten.add.Tensor, (result, bias))
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True
