"""The contract every weight-level adapter method fulfils.

A method is one file under ``adapt_compiler/passes/`` that defines a spec dataclass (subclass of
:class:`adapt_compiler.spec.AdapterSpec`) and a subclass of :class:`WeightMethod`, then registers it
with ``register(...)``. The pipeline never special-cases a method: it asks the method to

* ``check`` a target layer (raise :class:`AdapterShapeError` naming ``layer.fqn`` and the fix),
* ``init_params`` for that layer (PEFT's parameter names, PEFT's init),
* evaluate the adapted layer (``forward`` on the activation side, ``merged_weight`` on the weight
  side: ``layer.base(x, *merged_weight(...))``), and the lowering picks between the two with
  ``cost`` (sympy FLOP counts over the symbolic token count),
* merge (``merged_weight`` under no_grad) and map params to PEFT state-dict keys.

Weights are always seen in canonical layout: Linear and HF Conv1D as (d_out, d_in) (Conv1D is
transposed for the method and back for the model), Conv1d/2d/3d as (d_out, d_in/groups, *kernel),
Embedding as (num_embeddings, dim), a targeted nn.Parameter as stored ((d_out, d_in) or MoE experts'
(experts, ·, ·)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable, Mapping

import sympy
import torch
import torch.nn.functional as F


from ..errors import AdapterError, AdapterShapeError
from ..quant import QuantInfo, QuantizedWeight

PREPARED = "_prepared"  # key of a layer's `prepare_group` result in the params its forward receives
# key under which `init_params` may return the layer's new frozen base weight (canonical layout): PiSSA,
# OLoRA, CorDA start from W's principal part, so the base becomes W − s·B₀A₀. The caller swaps it into
# its frozen copy of the weight (never the user's model) and restores it when the adapter is deleted.
BASE_WEIGHT = "_ac_base_weight"


# conv layer kinds and their number of spatial dims (F.conv1d / conv2d / conv3d)
CONV_KINDS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Layer:
    """What a method needs to know about one target layer (never the module itself)."""

    fqn: str
    # "linear" | "conv1d" | "conv2d" | "conv3d" | "embedding" | "parameter" (a bare nn.Parameter, PEFT's
    # target_parameters: the slot maps W to W' wherever the graph reads it)
    kind: str
    weight_shape: tuple[int, ...]  # canonical layout (see module docstring)
    has_bias: bool
    dtype: torch.dtype
    transposed: bool = False  # stored as (d_in, d_out): HF Conv1D, `x @ W` matmuls
    stride: tuple[int, ...] = (1, 1)
    padding: Any = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    padding_idx: int | None = None
    max_norm: float | None = None
    embed_scale: float | None = None
    # where PEFT keeps this layer's adapter tensors (`<peft_path>.lora_A.weight`), when it is not `fqn`:
    # MultiheadAttention's out_proj (`mha.base_layer.out_proj`), a targeted nn.Parameter (its module,
    # nested `base_layer.` once per later-wrapped parameter of the same module)
    peft_path: str | None = None
    # the tensors the layer op reads as its weight and bias, when not `<fqn>.weight` / `.bias` (MHA's in_proj)
    weight_name: str = "weight"
    bias_name: str = "bias"
    # PEFT folds the adapter into the weight around each call (MultiheadAttention): no input dropout
    weight_only: bool = False
    # a factor on the adapter's delta: PEFT 0.21.2 merges MultiheadAttention's out_proj delta twice per
    # call (once itself, once through the wrapped out_proj), in forward and in merge_and_unload alike, so
    # its checkpoints mean 2·s·B·A there; we keep that meaning (see describe_layers)
    delta_factor: float = 1.0
    # a targeted nn.Parameter: "out_in" ((d_out, d_in), or MoE experts (E, d_out, d_in)) or "in_out"
    # (experts stored (E, d_in, d_out), transformers' `is_transposed`)
    layout: str = ""
    # an embedding weight whose rows at these indices are replaced by trainable ones (PEFT's
    # trainable_token_indices); the slot serves every read of the weight (tied output heads too)
    token_indices: tuple[int, ...] = ()
    # a quantized layer (quant/): its weight reaches methods as a QuantizedWeight, never as a tensor
    quant: QuantInfo | None = None

    @property
    def is_conv(self) -> bool:
        return self.kind in CONV_KINDS

    @property
    def spatial(self) -> int:
        """Spatial dims of a conv (1, 2, 3); 0 for every other kind."""
        return CONV_KINDS.get(self.kind, 0)

    @property
    def weight_fqn(self) -> str:
        """The FQN of the tensor the layer reads as its weight (a targeted parameter: itself)."""
        return self.fqn if self.kind == "parameter" else f"{self.fqn}.{self.weight_name}"

    @property
    def bias_fqn(self) -> str:
        return f"{self.fqn}.{self.bias_name}"

    @property
    def key_path(self) -> str:
        """The module path PEFT's state-dict keys of this layer start with."""
        return self.peft_path or self.fqn

    @property
    def out_features(self) -> int:
        return self.weight_shape[1] if self.kind == "embedding" else self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """d_in as the adapter sees it: a conv counts d_in (not d_in/groups · kernel)."""
        if self.kind == "embedding":
            return self.weight_shape[0]
        if self.is_conv:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[-1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """A conv's kernel (k,), (kh, kw) or (kd, kh, kw); () for every other kind."""
        return tuple(self.weight_shape[2:]) if self.is_conv else ()

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def pointwise(self) -> bool:
        """A conv whose kernel is 1 in every spatial dim (a per-position matmul)."""
        return self.is_conv and all(k == 1 for k in self.kernel_size)

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector (d_out,) shaped to broadcast over this layer's output."""
        return v.reshape(1, -1, *[1] * self.spatial) if self.is_conv else v.reshape(-1)

    def base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The frozen layer's own op with a (possibly adapted) canonical weight."""
        if isinstance(weight, QuantizedWeight):  # the quantized layer's op (re-dequantizes in backward)
            return weight.linear(x, bias)
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.is_conv:
            return self.conv(x, weight, bias)
        if self.kind == "embedding":
            return F.embedding(x, weight, self.padding_idx, self.max_norm)
        if self.kind == "parameter":  # the adapted parameter itself is the layer's output
            return weight
        raise AssertionError(self.kind)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias=None, **overrides) -> torch.Tensor:
        """F.conv{1,2,3}d with this layer's geometry, optionally overridden (e.g. groups=1, 1x1 stride)."""
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        kw.update(overrides)
        return _CONV_FNS[self.spatial](x, weight, bias, **kw)


class WeightMethod:
    """Base class of one-weight adapter methods. Subclasses override what differs."""

    kind: ClassVar[str] = "weight"
    name: ClassVar[str]  # registry key, e.g. "lora"
    peft_type: ClassVar[str]  # PEFT's PeftType value, e.g. "LORA"
    spec_type: ClassVar[type]
    # PEFT's parameter-name prefix (`lora_`, `hada_`, ...): every tensor init_params creates starts with it
    prefix: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    # spec fields a hotswap may change (fold_hotswap makes the compiled graph serve the new values)
    hotswap_foldable: ClassVar[frozenset[str]] = frozenset()
    # "additive": y = base(x) + delta(x); "multiplicative": W' = f(W); "none": not mergeable
    merge_kind: ClassVar[str] = "additive"
    # params that are state, not trained (e.g. AdaLoRA's ranknum): registered as buffers
    buffer_names: ClassVar[frozenset[str]] = frozenset()

    # -- targets, shapes and init -------------------------------------------------------------
    def resolve_spec(self, spec, model):
        """The spec as it applies to `model`, before anything is created (PEFT rewrites its config the same
        way, and the saved config says what was adapted). Default: unchanged."""
        return spec

    def parameter_layers(self, spec, model) -> dict[str, Layer]:
        """Layers of kind "parameter" the spec adds besides its target modules (LoRA's
        target_parameters and trainable_token_indices), by parameter FQN. Default: none."""
        return {}

    def buffers(self, spec) -> frozenset[str]:
        """Names of the tensors `init_params` creates that are state, not trained (registered as
        buffers: saved, never handed to the optimizer). Default: the method's `buffer_names`."""
        return self.buffer_names

    def check(self, spec, layer: Layer) -> None:
        """Raise AdapterShapeError naming layer.fqn and the fix if the layer cannot be adapted."""
        if layer.kind not in self.kinds:
            raise AdapterShapeError(
                f"{layer.fqn}: {self.name} does not support {layer.kind} layers "
                f"(supported: {', '.join(sorted(self.kinds))}); exclude it from `targets`."
            )

    def init_params(self, spec, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def init_shared(self, spec, layers: list[Layer]) -> dict[str, torch.Tensor]:
        """Tensors shared by every layer of one adapter (VeRA's frozen random projections), created
        once before `init_params`. Each layer's `forward`/`merged_weight` finds them in its params
        `p` under their own names. Default: none."""
        return {}

    def shared_peft_key(self, name: str) -> str | None:
        """PEFT's state-dict key (after `base_model.model.`) of a shared tensor; None: not saved."""
        return name

    # -- evaluation ------------------------------------------------------------------------
    def delta(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], x, weight, training: bool):
        """Additive methods: the adapter's contribution to the output (activation side)."""
        raise NotImplementedError

    def forward(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], x, weight, bias, training: bool):
        """The adapted layer evaluated on the activation side."""
        return layer.base(x, weight, bias) + self.delta(spec, layer, p, x, weight, training)

    def delta_weight(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], weight) -> torch.Tensor:
        """Additive methods: ΔW in canonical layout (differentiable)."""
        raise NotImplementedError

    def merged_weight(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], weight, bias):
        """(W', b') such that layer.base(x, W', b') equals forward in eval mode. Differentiable."""
        if self.merge_kind == "none":
            raise AdapterError(f"{layer.fqn}: {self.name} adapters cannot be merged into the weights.")
        return weight + self.delta_weight(spec, layer, p, weight).to(weight.dtype), bias

    def weight_side_ok(self, spec, training: bool) -> bool:
        """Whether merged_weight gives the same training forward (false with input dropout etc.)."""
        return self.merge_kind != "none"

    def reads_dense_weight(self, spec) -> bool:
        """Whether the activation-side forward needs the whole weight matrix W (MiSS's bat builds
        W' from W's blocks), which a quantized base holds only packed. Default: no."""
        return False

    # -- cross-layer batching (optional) ----------------------------------------------------
    def group_key(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], training: bool) -> Hashable | None:
        """Layers of one adapter whose keys are equal share one `prepare_group` call (None: never).
        The lowering also requires equal parameter dtypes and devices; the key says what else
        must agree (the shapes that get concatenated).

        The parameter-only part of a layer's forward (OFT's Cayley blocks, BOFT's butterfly) does
        not depend on the activations, so the lowering runs it once for all layers of a group as
        a few batched ops instead of the same small ops per layer (see lowering/batching.py).
        """
        return None

    def prepare_group(self, spec, ps: list[Mapping[str, torch.Tensor]], training: bool) -> list[torch.Tensor]:
        """The parameter-only part of the activation-side `forward` of several layers, one tensor
        per layer; `forward` finds its own as `p[PREPARED]` (and computes it itself when absent)."""
        raise NotImplementedError

    # -- cost model ------------------------------------------------------------------------
    def cost(self, spec, layer: Layer, tokens: sympy.Symbol) -> dict[str, sympy.Expr]:
        """FLOPs of the adapter's extra work per order, as sympy expressions of `tokens`.

        Keys are evaluation orders: "activation" (forward) and "weight" (rebuild W' then one
        base GEMM, counted as the ΔW build plus the W+ΔW add). The base GEMM is common to both
        and left out.
        """
        return {}

    # -- PEFT interop ----------------------------------------------------------------------
    def peft_key(self, param_name: str, layer: Layer) -> str | None:
        """Suffix after the module path in PEFT's state dict (None: not saved)."""
        return param_name

    def to_peft_config(self, spec) -> dict:
        raise NotImplementedError

    def from_peft_config(self, config: dict):
        raise NotImplementedError

    def saved_tensors(self, spec, layer: Layer, params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The tensors as written to a checkpoint (AdaLoRA drops pruned ranks). Default: unchanged."""
        return params

    def checkpoint_key(self, key: str) -> str:
        """A loaded checkpoint key in this method's current naming (Bone: `.bone_` -> `.miss_`)."""
        return key

    def spec_from_tensors(self, spec, tensors: dict):
        """The spec fitted to a checkpoint's PEFT-keyed tensors where its config disagrees with them
        (BOFT: PEFT on CPU saves one butterfly factor under N>1). Default: unchanged."""
        return spec

    # -- optional hooks ---------------------------------------------------------------------
    def before_call(self, table, name: str, training: bool) -> None:
        """Run before each eager call of the AdaptedModule, outside any compiled graph, with adapter `name`
        active (MonteCLoRA hands each layer its noise sample here). Default: nothing."""

    def runs_before_call(self, spec) -> bool:
        """Whether `before_call` does anything for this spec. Default: no."""
        return False

    def before_traced_call(self, table, name: str, training: bool) -> None:
        """torch.compile(m): Dynamo traces the module's call. Default: `before_call` runs eagerly on every
        call, outside Dynamo's graph (a graph break), when it does anything; traced into the graph it would
        run once, at trace time, and its state would go stale."""
        if self.runs_before_call(table.specs[name]):
            torch._dynamo.disable(self.before_call, reason="adapt_compiler: per-call adapter state")(
                table, name, training)

    def regularization_loss(self, spec, slots: list[tuple[Layer, Mapping[str, torch.Tensor]]]):
        """A loss term the user adds (AdaLoRA, HRA orthogonality). None if the method has none."""
        return None

    def kernel_operands(self, spec, layer: Layer, p: Mapping[str, torch.Tensor], training: bool):
        """(A (r, d_in), B (d_out, r), s) if the adapter on this layer is exactly y = base + s·(x Aᵀ)Bᵀ,
        so the fused and multi-adapter LoRA kernels (lowering/kernels) can serve it; else None."""
        return None

    def fold_hotswap(self, old_spec, new_spec, layer: Layer, p: Mapping[str, torch.Tensor]) -> None:
        """After a hotswap loaded tensors saved under `new_spec` into an adapter compiled with
        `old_spec`: rewrite them in place so the compiled graph (which keeps `old_spec`) computes
        what `new_spec` would. Only fields in `hotswap_foldable` can differ. Default: nothing."""


def spec_fields(spec) -> dict:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def matmul_flops(m, k, n):
    return 2 * m * k * n


class GraphMethod:
    """Base class of structural methods (Llama-Adapter, X-LoRA): they rewrite the captured graph.

    `setup(table, name, spec, sub_adapters)` creates the parameters eagerly (an nn.Module it returns,
    kept as `table.graph_adapters[name]`) from the model's structure; `rewrite(gm, table, name,
    captured)` splices the method into one captured graph (its modules are reachable as
    `names.graph_target(name, path)`). Methods never see the AdaptedModule, only the table.
    """

    kind: ClassVar[str] = "graph"
    name: ClassVar[str]
    peft_type: ClassVar[str]
    spec_type: ClassVar[type]
    prefix: ClassVar[str]
    merge_kind: ClassVar[str] = "none"
    # what `state_dict` keys are relative to in PEFT's files (X-LoRA's classifier: "base_model.")
    key_prefix: ClassVar[str] = "base_model.model."

    def sub_adapters(self, spec) -> dict:
        """Adapters this one is built from (X-LoRA's experts): name -> a spec or a PEFT directory.
        checkpoint.py reads the directories; `setup` receives name -> spec, and the checkpoint's
        tensors are then copied into the live tensors `sub_adapter_state` returns."""
        return {}

    def setup(self, table, name: str, spec, sub_adapters: dict):
        """Create the adapter's modules; return (holder nn.Module, the spec with anything resolved
        from the model filled in, e.g. X-LoRA's hidden_size). `sub_adapters`: name -> spec."""
        raise NotImplementedError

    def rewrite(self, gm, table, name: str, captured) -> None:
        raise NotImplementedError

    def before_call(self, table, name: str, training: bool) -> None:
        """Run before each eager call of the AdaptedModule, outside any compiled graph (Llama-Adapter
        refreshes its folded prompt projections here). Default: nothing."""

    runs_before_call = WeightMethod.runs_before_call
    before_traced_call = WeightMethod.before_traced_call

    def state_dict(self, table, name: str) -> dict[str, torch.Tensor]:
        """PEFT-format tensors (keys without `key_prefix`), the live tensors (loads copy into them)."""
        raise NotImplementedError

    def sub_adapter_state(self, table, name: str) -> dict:
        """For saving: sub-adapter name -> (its spec, the modules it targets, its PEFT-keyed tensors)."""
        return {}

    def to_peft_config(self, spec) -> dict:
        raise NotImplementedError

    def from_peft_config(self, config: dict):
        """`config` may carry "_ac_dir": the checkpoint directory, for paths relative to it."""
        raise NotImplementedError
