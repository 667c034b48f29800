"""Half-precision products on a CPU without native bf16/fp16: never both operands row-major.

torch 2.13 hands a bfloat16/float16 `mm` on the CPU to oneDNN only where the CPU has native
support for the dtype (AVX512-BF16 or AMX for bf16; AVX512-FP16 or AMX-FP16 for fp16). Elsewhere
(AVX2: AMD Zen 2/3, most laptops, this project's CI machine) ATen's own loops do it (BlasKernel.cpp;
upstream: pytorch/pytorch#146508). Those loops are fast when one operand is column-major and
20-100x slower when both are row-major. Measured here (2 threads, bf16, M x K @ K x N):

    128x5632 @ 5632x2048     both row-major 11.5 s    one column-major 0.10-0.18 s
    128x32000 @ 32000x2048   both row-major 71.2 s    left column-major 0.67 s

A linear layer's forward `x @ W.t()` has its weight column-major, but its backward `dy @ W` has
both row-major: on the 1B Llama shape (benchmarks/qlora_memory.py) a bf16 backward spends minutes
there, in PEFT as much as in an uncompiled graph of ours. So wherever this CPU is slow for a dtype:

- compiled lowerings: `ColumnMajorOperand`, an Inductor post-grad pass, makes each such product read
  its smaller operand through a column-major copy (Inductor writes the producer of an intermediate
  straight into that layout when it can);
- the guard's eager reference run of a compiled graph (forward and backward in one call):
  `reference_products` does the same for `aten.mm`/`aten.addmm` in a dispatch mode.

lowering="eager" is left as PEFT runs: a dispatch mode does not reach the backward the user calls
later, and rewriting the eager graph's linear layers into a custom autograd function would change
the graph that export and torch.compile(m) see. Train bf16 on such a CPU with a compiled lowering.

The products sum the same terms in another kernel: bf16 results can differ from PEFT's in the last
bit. The graph's `meta["ac_workarounds"]` says when the rewrite applies, and `report()` shows it;
COUNTERS["column_major_operands"] counts the products it rewrote.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._python_dispatch import TorchDispatchMode

from ..counters import COUNTERS

aten = torch.ops.aten
HALF = (torch.bfloat16, torch.float16)
WORKAROUND = ("half-precision GEMM on a CPU without native bf16/fp16 (pytorch#146508): products with both "
              "operands row-major read one through a column-major copy")
# op -> indices of (left, right) operands
_PRODUCTS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2)}
_DECIDED = "ac_slow_half_gemm"  # gm.meta: needs_rewrite's answer


@functools.cache
def slow_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` products in ATen's own loops (no oneDNN support for it)."""
    if dtype not in HALF:
        return False
    mkldnn = torch.backends.mkldnn
    if not mkldnn.is_available():
        return True
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    return not supported()


def _slow(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in HALF and slow_half_gemm(t.dtype)


def _operand_to_flip(at: tuple[int, int], a, b) -> int | None:
    """The argument index (of `at`, the product's operand indices) to read column-major: the smaller of
    `a` and `b` when both are slow half-precision row-major matrices, else None."""
    if not (_slow(a) and _slow(b) and a.dim() == 2 and b.dim() == 2
            and a.stride(-1) == 1 and b.stride(-1) == 1 and a.stride(0) != 1 and b.stride(0) != 1):
        return None
    return at[0] if _numel_hint(a) <= _numel_hint(b) else at[1]


def graph_tensors(gm: fx.GraphModule) -> list:
    """The tensors `gm` computes with: its placeholders' values (fake, from the capture) and its attributes."""
    return [*(n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"), *gm.parameters(), *gm.buffers()]


def needs_rewrite(gm: fx.GraphModule) -> bool:
    """Whether `gm` computes in a half dtype on a CPU that is slow for it (module docstring): its
    tensors tell, scanned once (lowering and the guard both ask). Records the decision in
    meta["ac_workarounds"] on every call: pipeline.lower resets that list before each lowering."""
    if _DECIDED not in gm.meta:
        gm.meta[_DECIDED] = any(_slow(v) for v in graph_tensors(gm))
    if gm.meta[_DECIDED]:
        said = gm.meta.setdefault("ac_workarounds", [])
        if WORKAROUND not in said:
            said.append(WORKAROUND)
    return gm.meta[_DECIDED]


# -- compiled lowerings ------------------------------------------------------------------------------
class ColumnMajorOperand(CustomGraphPass):
    """Post-grad: `mm(a, b)` / `addmm(c, a, b)` on slow half-precision CPU tensors whose operands are
    both row-major reads its smaller operand as `permute(clone(permute(x)))`, a column-major copy.
    `then`: a pass to run after this one (the decode step's FewRowProducts, lowering/gemv.py)."""

    def __init__(self, then: CustomGraphPass | None = None):
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        COUNTERS["column_major_operands"] += sum(_rewrite(graph, node) for node in list(graph.nodes))
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        return get_hash_for_files((__file__,)) + (self.then.uuid() if self.then is not None else b"")

    def __repr__(self):  # options are fingerprinted by repr (lowering/guard.py): no object address
        return f"ColumnMajorOperand(then={self.then!r})"


def _rewrite(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _PRODUCTS:
        return False
    at = _PRODUCTS[node.target]
    if len(node.args) <= max(at) or not all(isinstance(node.args[i], fx.Node) for i in at):
        return False
    which = _operand_to_flip(at, *(node.args[i].meta.get("val") for i in at))
    if which is None:
        return False
    operand = node.args[which]
    with graph.inserting_before(node):
        flipped = graph.call_function(aten.permute.default, (operand, [1, 0]))
        copied = graph.call_function(aten.clone.default, (flipped,), {"memory_format": torch.contiguous_format})
        column_major = graph.call_function(aten.permute.default, (copied, [1, 0]))
    args = list(node.args)
    args[which] = column_major
    node.args = tuple(args)
    return True


def _numel_hint(t: torch.Tensor) -> int:
    """Element count, with symbolic sizes at their hint (a training graph's token dim)."""
    n = 1
    for s in t.shape:
        n *= s if isinstance(s, int) else (s.node.hint if s.node.has_hint() else 8192)
    return int(n)


def inductor_options(gm: fx.GraphModule, options: dict | None) -> dict | None:
    """`options` with ColumnMajorOperand added where `gm` needs it (chained before a pass already set)."""
    if not needs_rewrite(gm):
        return options
    options = dict(options or {})
    options["post_grad_custom_post_pass"] = ColumnMajorOperand(options.get("post_grad_custom_post_pass"))
    return options


# -- the guard's eager reference ----------------------------------------------------------------------
class _ColumnMajorMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            at = _PRODUCTS[func]
            which = _operand_to_flip(at, *(args[i] for i in at))
            if which is not None:
                args = list(args)
                args[which] = args[which].t().contiguous().t()
                COUNTERS["column_major_operands"] += 1
        return func(*args, **(kwargs or {}))


def reference_products(gm: fx.GraphModule):
    """A context for an eager run of `gm` and its backward together (the guard's reference run,
    lowering/guard.py): the column-major operands in a dispatch mode where `gm` needs them, else
    nothing. A mode is thread-local state of the code inside it: a backward the user runs later is
    not in it, which is why the eager lowering itself is not rewritten (module docstring)."""
    return _ColumnMajorMode() if needs_rewrite(gm) else contextlib.nullcontext()
