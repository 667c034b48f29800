"""The torch.compile backend: adapter patterns in Dynamo graphs, lowered before Inductor.

    torch.compile(peft_model, backend="adapt_compiler")           # entry point (pyproject)
    torch.compile(model, backend=ac.backend("adapter_dir", merge=True))

Steps, on the FX graph Dynamo hands us (torch-level ops; parameters are placeholders whose
Dynamo source names their module path):

    1. fuse_peft_lora        PEFT's LoRA subgraph
                                 add(linear(x, W, b), mul(linear(linear(drop(x), A), B), s))
                             (drop = identity or dropout with training=False) becomes
                                 adapt_compiler::fused_lora_linear(x, W, b, A, B, s)
                             the same op our own lowering uses: the Triton kernel on CUDA, its
                             reference (then Inductor's C++) on CPU.
    2. apply_spec            only with ac.backend(spec_or_dir): the adapter's target layers, found
                             by module path, get the adapter: merge=True replaces each target
                             weight by the merged W' (a graph constant; the model is untouched),
                             merge=False routes LoRA Linear layers through the fused op.
    3. Inductor              compile_fx on the rewritten graph.

All rewrites happen before Inductor sees the graph, so Inductor's FX graph cache keys on the
rewritten graph; no Inductor hook is installed (a hook would be a CustomGraphPass with a uuid()
over its source). Each rewrite bumps a counter in `passes.COUNTERS`.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from ..passes import COUNTERS, method_for
from ..passes.method import AdapterError, Layer

LINEAR = (torch._C._nn.linear, F.linear)
DROPOUT = (F.dropout, torch.dropout)


def _fused_op():
    from . import kernels  # noqa: F401 - registers the ops

    return torch.ops.adapt_compiler.fused_lora_linear.default


# -- 1. PEFT's LoRA subgraph -----------------------------------------------------------------------
def _is_linear(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEAR


def _linear_args(node):
    args = list(node.args) + [node.kwargs.get(k) for k in ("input", "weight", "bias")[len(node.args):]]
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    return x, w, b


def _undropped(node):
    """x if `node` is x itself or dropout(x, p, training=False) / dropout(x, 0.0, ...); else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in DROPOUT:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        if training is False or p == 0:
            return node.args[0]
        return None
    return node


def _match_lora_delta(node):
    """mul(linear(linear(drop(x), A), B), s) (either operand order) -> (x, A, B, s) or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.mul, torch.mul)):
        return None
    expand, s = node.args[0], node.args[1]
    if not _is_linear(expand):
        expand, s = s, expand
    if not _is_linear(expand) or not isinstance(s, (int, float)) or isinstance(s, bool):
        return None
    shrink, b, b_bias = _linear_args(expand)
    if b_bias is not None or not _is_linear(shrink):
        return None
    dropped, a, a_bias = _linear_args(shrink)
    if a_bias is not None:
        return None
    x = _undropped(dropped)
    return None if x is None else (x, a, b, float(s))


def fuse_peft_lora(gm: fx.GraphModule) -> int:
    """Rewrite each PEFT LoRA subgraph to the fused op. Returns the number rewritten."""
    op = _fused_op()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.args) != 2:
            continue
        for base, delta in (node.args, node.args[::-1]):
            if not _is_linear(base):
                continue
            m = _match_lora_delta(delta)
            if m is None:
                continue
            x, w, bias = _linear_args(base)
            x_l, a, b, s = m
            if x_l is not x:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(op, (x, w, bias, a, b, s))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
            break
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    COUNTERS["backend_peft_lora_fused"] += count
    return count


# -- 2. an adapter applied by module path ----------------------------------------------------------
def _module_path(node: fx.Node) -> str | None:
    """'model.layers.0.q_proj.weight' from a placeholder's Dynamo source, else None."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name  # a method in older torch
    parts = re.findall(r"\['([^']*)'\]", name)
    parts = [p for p in parts[1:] if p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts) or None


def _layer_of(fqn: str, w_node: fx.Node, example: torch.Tensor, bias: torch.Tensor | None):
    """The Layer a weight placeholder feeds (linear, HF Conv1D addmm, embedding), or None."""
    for user in w_node.users:
        if _is_linear(user) and _linear_args(user)[1] is w_node:
            kind, shape, transposed = "linear", tuple(example.shape), False
        elif user.op == "call_function" and user.target in (torch.addmm,) and user.args[2] is w_node:
            kind, shape, transposed = "linear", tuple(example.shape[::-1]), True  # Conv1D: W is (d_in, d_out)
        elif user.op == "call_function" and user.target in (F.embedding,) and user.args[1] is w_node:
            kind, shape, transposed = "embedding", tuple(example.shape), False
        else:
            continue
        return Layer(fqn=fqn, kind=kind, weight_shape=shape, has_bias=bias is not None, dtype=example.dtype,
                     transposed=transposed)
    return None


class AdapterBackend:
    """`torch.compile(model, backend=ac.backend(spec_or_dir, merge=...))`."""

    def __init__(self, spec_or_dir=None, merge: bool = False):
        from ..checkpoint import read_tensors, spec_from_dir
        from ..spec import AdapterSpec

        self.merge = merge
        self.spec, self.tensors, self.where = None, {}, None
        if isinstance(spec_or_dir, (str, Path)):
            self.spec, self.tensors, self.where = spec_from_dir(spec_or_dir), read_tensors(spec_or_dir), str(spec_or_dir)
        elif isinstance(spec_or_dir, AdapterSpec):
            self.spec = spec_or_dir
        elif spec_or_dir is not None:
            raise AdapterError(
                f"ac.backend(): expected an adapter spec or a PEFT adapter directory, got {type(spec_or_dir).__name__}."
            )
        elif merge:
            raise AdapterError("ac.backend(merge=True) needs the adapter: ac.backend(spec_or_dir, merge=True).")
        if self.spec is not None:
            method = method_for(self.spec)
            if getattr(method, "kind", "weight") == "graph":
                raise AdapterError(f"ac.backend(): {method.name} is a graph-level method; use ac.compile(model, spec).")
            if self.spec.targets is None:
                raise AdapterError("ac.backend(): the spec needs explicit targets=[...] (no model type to default from).")
        self._params: dict[str, dict] = {}  # fqn -> adapter tensors (created once, reused on recompiles)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        fuse_peft_lora(gm)
        if self.spec is not None:
            self.apply_spec(gm, example_inputs)
        return _inductor(gm, example_inputs)

    def _adapter_params(self, method, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        from ..checkpoint import PREFIX

        if layer.fqn not in self._params:
            p = method.init_params(self.spec, layer, weight.t() if layer.transposed else weight)
            for pname in p:
                key = method.peft_key(pname, layer)
                t = self.tensors.get(f"{PREFIX}{layer.fqn}.{key}")
                if self.where is not None and key is not None:
                    if t is None or tuple(t.shape) != tuple(p[pname].shape):
                        raise AdapterError(
                            f"{self.where}: no tensor of shape {tuple(p[pname].shape)} for {layer.fqn}.{key}; "
                            f"use the checkpoint made for this model."
                        )
                    p[pname] = t.to(p[pname].dtype)
            self._params[layer.fqn] = {k: v.to(weight.device) for k, v in p.items()}
        return self._params[layer.fqn]

    def apply_spec(self, gm: fx.GraphModule, example_inputs) -> int:
        from ..spec import is_target

        method = method_for(self.spec)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        by_path = {}
        for node, example in zip(placeholders, example_inputs):
            path = _module_path(node)
            if path is not None and isinstance(example, torch.Tensor):
                by_path[path] = (node, example)
        count = 0
        for path, (w_node, w) in by_path.items():
            if not path.endswith(".weight"):
                continue
            fqn = path[: -len(".weight")]
            if not is_target(self.spec, fqn, self.spec.targets):
                continue
            b_node, b = by_path.get(fqn + ".bias", (None, None))
            layer = _layer_of(fqn, w_node, w, b)
            if layer is None:
                continue
            method.check(self.spec, layer)
            p = self._adapter_params(method, layer, w)
            if self.merge:
                self._merge_weight(gm, method, layer, p, w_node, w, b_node, b)
            else:
                self._route_unmerged(gm, method, layer, p, w_node)
            count += 1
        if count == 0 and self.where is not None:
            raise AdapterError(f"ac.backend({self.where}): no layer of the compiled graph matched the adapter's targets.")
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        COUNTERS["backend_layers_adapted"] += count
        return count

    def _constant(self, gm: fx.GraphModule, node: fx.Node, name: str, value: torch.Tensor, like=False) -> fx.Node:
        """A graph constant (get_attr of a new buffer on gm) inserted after `node`."""
        attr = "_ac_" + re.sub(r"\W", "_", name)
        gm.register_buffer(attr, value, persistent=False)
        if hasattr(gm, "_param_name_to_source"):  # AOT autograd dedups Dynamo graph params by source
            from torch._dynamo.source import ConstantSource

            gm._param_name_to_source[attr] = ConstantSource(attr)
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(attr)
        if like:  # same shape and dtype as `node`: its example value describes the constant too
            const.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")})
        return const

    def _merge_weight(self, gm, method, layer, p, w_node, w, b_node, b) -> None:
        with torch.no_grad():
            w0 = (w.t() if layer.transposed else w).float()
            new_w, new_b = method.merged_weight(self.spec, layer, {k: v.float() for k, v in p.items()}, w0,
                                                None if b is None else b.float())
            new_w = (new_w.t() if layer.transposed else new_w).to(w.dtype).contiguous()
        const = self._constant(gm, w_node, layer.fqn + ".weight", new_w, like=True)
        w_node.replace_all_uses_with(const, delete_user_cb=lambda u: u is not const)
        if b_node is not None and new_b is not None and not torch.equal(new_b.to(b.dtype), b):
            bconst = self._constant(gm, b_node, layer.fqn + ".bias", new_b.to(b.dtype).contiguous(), like=True)
            b_node.replace_all_uses_with(bconst, delete_user_cb=lambda u: u is not bconst)

    def _route_unmerged(self, gm, method, layer, p, w_node) -> None:
        from ..passes.lora import scaling_of
        from .kernels import kernel_applies

        if not (kernel_applies(method, self.spec, layer, training=False) and not layer.transposed):
            raise AdapterError(
                f"{layer.fqn}: ac.backend(..., merge=False) serves LoRA on Linear layers; for {method.name} on a "
                f"{layer.kind} use merge=True or ac.compile(model, spec)."
            )
        op = _fused_op()
        a = self._constant(gm, w_node, layer.fqn + ".lora_A", p["lora_A"].detach())
        b = self._constant(gm, w_node, layer.fqn + ".lora_B", p["lora_B"].detach())
        s = scaling_of(self.spec, layer)
        for user in list(w_node.users):
            if _is_linear(user) and _linear_args(user)[1] is w_node:
                x, w, bias = _linear_args(user)
                with gm.graph.inserting_before(user):
                    new = gm.graph.call_function(op, (x, w, bias, a, b, s))
                new.meta.update(user.meta)
                user.replace_all_uses_with(new)
                gm.graph.erase_node(user)


def _inductor(gm: fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def adapt_compiler_backend(gm: fx.GraphModule, example_inputs):
    """`torch.compile(model, backend="adapt_compiler")`: PEFT LoRA -> the fused op, then Inductor."""
    fuse_peft_lora(gm)
    return _inductor(gm, example_inputs)


def make_backend(spec_or_dir=None, merge: bool = False):
    """`ac.backend(spec_or_dir, merge=...)`: a torch.compile backend serving that adapter."""
    if spec_or_dir is None and not merge:
        return adapt_compiler_backend
    return AdapterBackend(spec_or_dir, merge=merge)
