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

The decision is visible: the graph's `meta["ac_gemv"]` says how many of its linear layers see one
row, and report() prints it. The pass fires only where one row is statically known: in a decode
step, and in a prefill graph only for the LM head (HF computes the last position's logits).
Training graphs never get it.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..names import SLOTS

GEMV = "ac_gemv"
OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
MAX_DIM = 2048  # Inductor's CPU limit for decompose_mm_pass (cpu_max_other_dimension_decomposition)


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
    static = all(isinstance(d, int) for d in x.shape[:-1])
    return (math.prod(x.shape[:-1]) if static else None), int(out), int(inp)


def decode_options(gm: fx.GraphModule) -> dict | None:
    """Inductor options for `gm` if it is a static eval graph with one-row CPU linear layers that the
    reduction serves (see the module docstring), else None. Records the decision in gm.meta."""
    if gm.meta.get("ac_training"):
        return None
    layers = [r for r in (_rows_and_dims(n, gm) for n in gm.graph.nodes) if r is not None]
    served = [r for r in layers if r[0] == 1 and r[1] <= MAX_DIM and r[2] <= MAX_DIM]
    if not served:
        return None
    gm.meta[GEMV] = (f"{len(served)} of {len(layers)} linear layers see one row: matrix-vector products as "
                     f"fused reductions (Inductor decompose_mm_pass; BLAS GEMV streams short rows slowly)")
    return OPTIONS
