"""Lowering: decide how each adapted layer is evaluated, then hand the graph to torch.compile.

    plan.py       per adapter and layer: evaluation order (cost model), Triton kernel or not,
                  mixed-batch implementation; written on the graph's nodes
    batching.py   parameter-only transforms batched across layers (OFT/BOFT/HRA)
    slots.py      the runtime modules the adapted graph calls (they obey the plan)
    mixed.py      one adapter per sample (`adapter_names=`)
    recompute.py  activation checkpointing of repeated blocks (training graphs)
    merge.py      fold adapters into the weights
    dynamic.py    whole-graph compiles dynamic from the first call (one compile for every batch/length)
    regional.py   lowering="regional": each distinct repeated block compiled once (aot_region.py)
    auto.py       lowering="auto": eager calls while the whole graph compiles in a background thread
    step.py       graphs compiled over flat leaves (calls that carry a KV cache: the decode step)
    gemv.py       one-row CPU linear layers (batch-1 decode) as fused reductions, not BLAS GEMV
    half_gemm.py  bf16/fp16 products on a CPU without native support: never both operands row-major
    prewarm.py    Inductor's once-per-process CPU set-up, in a thread while the first capture runs
    backend.py    the torch.compile backend (PEFT models and plain models with ac.backend(...))
    kernels/      Triton kernels with pure-torch references

`lower(gm, how)` is the last step of the pipeline (pipeline.py): the whole adapted graph is
compiled with Inductor (C++ on CPU, Triton on CUDA), compiled one distinct repeated block at a time
with lowering="regional", or run as is with lowering="eager".
"""

from __future__ import annotations

import torch
from torch import fx

from . import kernels

LOWERINGS = ("inductor", "regional", "eager", "auto")


def lower(gm: fx.GraphModule, how, options: dict | None = None, memory_budget: float | None = None):
    """`how`: "inductor", "regional", "eager", "auto" (compiled as "inductor"; pipeline.lower serves eager
    calls until it is compiled), or any torch.compile backend (a callable). `options`: Inductor
    config for this graph only. `memory_budget` (Inductor): AOTAutograd's activation memory budget
    for this graph, the fraction of activation memory its partitioner may keep (it recomputes the
    cheapest rest in the backward)."""
    if how == "eager":
        return gm
    if how == "inductor":
        return _whole_partitioned(gm, options, memory_budget)
    if how == "auto":  # the whole graph as "inductor"; the pipeline runs eager until it is compiled (auto.py)
        from .auto import compile_whole

        return _with_memory_budget(compile_whole(gm, options), memory_budget, checkpointed=_checkpoints(gm))
    if how == "regional":
        from .regional import lower_regional

        return lower_regional(gm, options, _whole_partitioned)
    if callable(how):
        return torch.compile(gm, backend=how, dynamic=None)
    raise ValueError(f"lowering={how!r} is not one of {LOWERINGS} or a torch.compile backend")


def _with_memory_budget(compiled, budget: float | None, checkpointed: bool = False):
    """`compiled`, run with AOTAutograd's partitioner set for this graph (it reads its config when it
    partitions the graph, on the first call and on any recompilation):

    - `budget`: AOTAutograd's activation memory budget (None: its default, no limit).
    - `checkpointed` (the graph calls torch.utils.checkpoint on blocks, lowering/recompute.py): no
      common-subexpression elimination on the joint graph. It merges the identical nodes of
      different checkpointed blocks (each decoder layer turns the same attention mask into the
      same float mask), the merged node then feeds every block, and the partitioner keeps it for
      the backward instead of recomputing it per block: 8 MiB at batch 8 x 512 on top of the
      blocks' inputs, the whole gap to PEFT's checkpointed step (benchmarks/memory_budget.py).
    Returns `compiled` itself when there is nothing to set."""
    patch = {}
    if budget is not None:
        patch["activation_memory_budget"] = budget
    if checkpointed:
        patch["cse"] = False
    if not patch:
        return compiled
    from torch._functorch import config as functorch_config

    def run(*args, **kwargs):
        with functorch_config.patch(patch):
            return compiled(*args, **kwargs)

    run.compiled = compiled
    return run


def _checkpoints(gm: fx.GraphModule) -> bool:
    return any(n.target is torch.utils.checkpoint.checkpoint for n in gm.graph.nodes)


def _whole_partitioned(gm: fx.GraphModule, options: dict | None, memory_budget: float | None = None):
    """`_whole`, with AOTAutograd's partitioner set for this graph (see _with_memory_budget); also
    regional's whole-graph fallback."""
    return _with_memory_budget(_whole(gm, options), memory_budget, checkpointed=_checkpoints(gm))


def _whole(gm: fx.GraphModule, options: dict | None):
    from .dynamic import compile_whole
    from .lifted import LIFTED, LiftedProgram, why_not

    if gm.meta.get("ac_flat") and not gm.meta.get("ac_training"):  # a KV-cache call: over its tensors
        reason = why_not(gm)
        if reason is None:
            return LiftedProgram(gm, lambda lifted: compile_whole(lifted, options))
        gm.meta[LIFTED] = f"compiled as built: {reason}"
    return compile_whole(gm, options)


def lowering_name(how) -> str:
    return how if isinstance(how, str) else getattr(how, "__name__", type(how).__name__)


def kernel_backend(device: torch.device) -> str:
    """Which implementation serves plain low-rank adapters on this device (report)."""
    if device.type == "cuda":
        # fused LoRA on Linear slots (order "kernel" in the report rows), SGMV for mixed batches
        return "triton (fused_lora_linear, multi_lora)" if kernels.HAVE_TRITON else "inductor"
    return "inductor-cpp (reference ops)"
