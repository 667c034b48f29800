"""Capture of quantized layers: one op per layer while torch.export traces the model, stable names after.

torch.export (non-strict) cannot trace bitsandbytes' layers (their parameters' Python attributes,
e.g. `Params4bit.quant_state`, are lost when export swaps in fake tensors), and traces torchao's
weight-only linear into ops that save a full-precision W for the backward. So while the model is
exported, `quantized_leaves` gives each known quantized layer an instance `forward` that is one
`adapt_compiler::<kind>_linear` op over its operands. Nothing else changes, and the attribute is
removed on exit, also on error: the user's module is as it was.

`name_operands` then rewrites each op's tensor arguments into reads of `<fqn>.weight` and
`<fqn>.weight__<operand>` (export names the quantization state it lifts `lifted_tensor_<N>`, with a
counter that depends on the capture): the same names the AdaptedModule's frozen table uses, so every
graph of the pipeline is rooted at those tensors, by name, and holds no copy of them.
"""

from __future__ import annotations

import contextlib

from torch import fx, nn

from ..names import attach
from .kinds import KINDS, QuantInfo, operand_key

_MISSING = object()


def known_layers(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module for every layer of a known quantized kind (never raises)."""
    return {fqn: mod for fqn, mod in model.named_modules() if any(k.detect(mod) for k in KINDS.values())}


@contextlib.contextmanager
def quantized_leaves(model: nn.Module, infos: dict[str, QuantInfo], operands: dict[str, dict]):
    """Within: each layer in `infos` (FQN -> QuantInfo) runs as its kind's op over `operands`
    (FQN -> operand name -> tensor). Yields `infos`; the layers' own forwards are back on exit."""
    modules = dict(model.named_modules())
    saved = []
    try:
        for fqn, info in infos.items():
            mod = modules[fqn]
            saved.append((mod, mod.__dict__.get("forward", _MISSING)))
            mod.forward = KINDS[info.kind].capture_forward(mod, info, operands[fqn])
        yield infos
    finally:
        for mod, previous in saved:
            if previous is _MISSING:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous


def name_operands(gm: fx.GraphModule, infos: dict[str, QuantInfo], operands: dict[str, dict]) -> int:
    """Make every quant op read its operands as `get_attr <fqn>.weight[__<operand>]` (see the module
    docstring); the tensors are attached to `gm` under those names. Returns the ops renamed."""
    ops = {KINDS[i.kind].op for i in infos.values()}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        fqn = _fqn(node)
        info = infos[fqn]
        args = list(node.args)
        for i, name in enumerate(info.operands):
            old = args[2 + i]
            if not isinstance(old, fx.Node):
                continue
            target = operand_key(fqn, name)
            if old.op == "get_attr" and old.target == target:
                continue
            attach(gm, target, operands[fqn][name])
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(target)
            new.meta.update({k: v for k, v in old.meta.items() if k == "val"})
            args[2 + i] = new
        node.args = tuple(args)
        count += 1
    for node in list(gm.graph.nodes):  # the lifted constants nothing reads any more
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    return count


def _fqn(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


