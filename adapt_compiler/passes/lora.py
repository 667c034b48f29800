"""LoRA (low-rank adaptation), with rsLoRA and DoRA, matching PEFT 0.21.2 `tuners/lora`.

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ            s = alpha / r  (rsLoRA: alpha / √r)
    DoRA: y = (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b   (norm detached, eval or p=0)

Linear / HF Conv1D: A (r, d_in), B (d_out, r). Conv2d: A is a conv with the base kernel, stride and
padding; B is a 1×1 conv with the base groups. Embedding: A (r, num_embeddings), B (dim, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import AdapterSpec, check_positive, check_probability
from ._patterns import pattern_value
from ._lora_init import INITIALISERS, initialiser_for
from .method import BASE_WEIGHT, AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


@dataclass
class LoRA(AdapterSpec):
    method = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = False
    # True (kaiming A, zero B) | "gaussian" | False (B not zero) | an initialiser of passes/_lora_init*.py:
    # "pissa", "pissa_niter_<k>", "olora", "mica", "corda", "eva", ... (PEFT's init_lora_weights values)
    init: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        check_probability(self, dropout=self.dropout)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterError(f"LoRA: alpha={self.alpha!r} must be a positive number (PEFT's lora_alpha).")
        if self.init not in (True, False, "gaussian") and initialiser_for(self.init) is None:
            known = ", ".join(repr(n) for n in sorted(INITIALISERS))
            raise AdapterError(f"LoRA: init={self.init!r} (PEFT's init_lora_weights) is not supported; use True, "
                               f"False, 'gaussian' or one of {known}.")


def rank_of(spec: LoRA, layer: Layer) -> int:
    return pattern_value(spec.rank_pattern, layer.fqn, spec.r)


def scaling_of(spec: LoRA, layer: Layer) -> float:
    r = rank_of(spec, layer)
    alpha = pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha)
    return alpha / math.sqrt(r) if spec.rslora else alpha / r


def _counted(fn, layer: Layer, p):
    """`fn(p)` (the adapter's delta from its tensors p) as PEFT counts it on this layer. MultiheadAttention's
    out_proj adds it twice per call (`delta_factor` 2), the second time by a `.data` update that autograd
    does not see: the value counts twice, and so does the gradient to the layer's input, but the adapter's
    own tensors get the gradient of one copy. The second copy reads them detached."""
    delta = fn(p)
    if layer.delta_factor == 1:
        return delta
    frozen = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    return delta + (layer.delta_factor - 1) * fn(frozen)


class LoRAMethod(WeightMethod):
    name = "lora"
    peft_type = "LORA"
    prefix = "lora_"
    spec_type = LoRA
    # PEFT: Linear, HF Conv1D, Conv1d/2d/3d, Embedding, nn.MultiheadAttention (as its in_proj + out_proj)
    kinds = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding", "multihead_attention"})
    # the scaling is folded into B (fold_hotswap); init is history; the compiled dropout p stays
    # (hotswap serves inference)
    hotswap_foldable = frozenset({"r", "alpha", "rslora", "rank_pattern", "alpha_pattern", "init", "dropout"})

    def check(self, spec: LoRA, layer: Layer) -> None:
        super().check(spec, layer)
        found = initialiser_for(spec.init)
        if found is not None:
            init = found[0]
            if layer.kind not in init.kinds or (layer.transposed and not init.transposed_ok):
                what = "an HF Conv1D (transposed) layer" if layer.transposed else f"a {layer.kind} layer"
                raise AdapterShapeError(
                    f"{layer.fqn}: init={spec.init!r} (PEFT's init_lora_weights) does not support {what} (PEFT "
                    f"runs it on {', '.join(sorted(init.kinds))}"
                    f"{'' if init.transposed_ok else ', not HF Conv1D'}); exclude the layer or use init=True.")
        r = rank_of(spec, layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterShapeError(f"{layer.fqn}: LoRA r={r!r} (from rank_pattern) must be a positive integer.")
        if layer.is_conv and not layer.pointwise and any(d != 1 for d in layer.dilation) and layer.padding != "same":
            # PEFT's lora_A copies kernel, stride and padding but not the dilation: its output would not line up
            raise AdapterShapeError(
                f"{layer.fqn}: LoRA on a conv with dilation={layer.dilation}: PEFT's lora_A conv drops the dilation, "
                f"so its output size differs from the layer's (PEFT fails there too); exclude it from `targets`.")
        if layer.weight_only and spec.use_dora:
            raise AdapterShapeError(f"{layer.fqn}: DoRA on nn.MultiheadAttention is not supported (PEFT raises too); "
                                    f"use use_dora=False or exclude it from `targets`.")
        if layer.is_conv and r % layer.groups:
            raise AdapterShapeError(
                f"{layer.fqn}: LoRA rank r={r} must be divisible by the conv's groups={layer.groups}; "
                f"pick r as a multiple of {layer.groups}."
            )

    def init_params(self, spec: LoRA, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r = rank_of(spec, layer)
        dt = weight.dtype
        found = initialiser_for(spec.init)
        if found is not None and not found[0].data:
            # PiSSA / OLoRA / MiCA ...: the factors (and maybe a new base weight) from W itself
            init, option = found
            got = init.init(layer, weight, r, scaling_of(spec, layer), option)
            params = {"lora_A": got.a, "lora_B": got.b}
            if got.base is not None:
                params[BASE_WEIGHT] = got.base
                weight = got.base  # DoRA's magnitude is ‖W_res + s·B₀A₀‖ = ‖W‖, as PEFT computes it
            return self._with_magnitude(spec, layer, weight, params)
        if layer.kind == "embedding":
            # PEFT: A zero, B normal (the other way round from Linear)
            a = torch.zeros(r, layer.weight_shape[0], dtype=dt)
            b = torch.randn(layer.weight_shape[1], r, dtype=dt)
            if spec.init is False:
                a = torch.randn_like(a)
        else:
            if layer.is_conv:
                a = torch.empty(r, layer.in_features, *layer.kernel_size, dtype=dt)
                b = torch.empty(layer.out_features, r // layer.groups, *[1] * layer.spatial, dtype=dt)
            else:
                a = torch.empty(r, layer.in_features, dtype=dt)
                b = torch.empty(layer.out_features, r, dtype=dt)
            if spec.init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if spec.init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)
        return self._with_magnitude(spec, layer, weight, {"lora_A": a, "lora_B": b})

    def _with_magnitude(self, spec: LoRA, layer: Layer, weight, params: dict) -> dict:
        """DoRA: add m = ‖W + s·BA‖ (per output row) to the params, so the layer starts at W."""
        if spec.use_dora:
            with torch.no_grad():
                params["lora_magnitude_vector"] = self._weight_norm(
                    spec, layer, weight, self._dora_lora_weight(layer, params, weight.shape)
                ).to(weight.dtype)
        return params

    def buffers(self, spec: LoRA) -> frozenset[str]:
        found = initialiser_for(spec.init)
        return self.buffer_names | (found[0].frozen if found else frozenset())

    # -- the low-rank product ------------------------------------------------------------
    def _lora_weight(self, layer: Layer, p, weight_shape) -> torch.Tensor:
        """B·A in the canonical weight layout (unscaled)."""
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "embedding":
            return (b @ a).T  # (num, dim)
        if layer.is_conv:
            if layer.pointwise:
                return (b.flatten(1) @ a.flatten(1)).reshape(weight_shape)
            # PEFT: conv(Aᵀ, B)ᵀ; exact for groups == 1 (PEFT cannot merge grouped convs, nor can we)
            return layer.conv(a.transpose(0, 1), b, stride=1, padding=0, dilation=1, groups=1).transpose(0, 1)
        return b @ a

    def _dora_lora_weight(self, layer: Layer, p, weight_shape) -> torch.Tensor:
        """B·A as DoRA's weight norm reads it. For a conv PEFT flattens the factors, (B.view(-1, r) @
        A.view(r, -1)).view(W.shape): B·A itself for groups == 1, and for a grouped conv (B holds r/g
        channels per output) the same reshape, PEFT's convention for the (detached) norm."""
        if not layer.is_conv:
            return self._lora_weight(layer, p, weight_shape)
        a, b = p["lora_A"], p["lora_B"]
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight_shape)

    def _weight_norm(self, spec, layer: Layer, weight, lora_weight) -> torch.Tensor:
        w = weight + scaling_of(spec, layer) * lora_weight
        if layer.is_conv:
            return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)  # (1, d_out, 1, …)
        if layer.kind == "embedding":
            return torch.linalg.norm(w, dim=0)  # per embedding dim
        return torch.linalg.norm(w, dim=1)

    def _low_rank(self, spec, layer: Layer, p, x, training: bool) -> torch.Tensor:
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "embedding":
            return F.embedding(x, a.T, layer.padding_idx, layer.max_norm) @ b.T
        # MultiheadAttention's layers: PEFT merges the adapter into the weights around the call, so no dropout
        x = F.dropout(x, spec.dropout, training) if spec.dropout and not layer.weight_only else x
        x = x.to(a.dtype)  # like PEFT: the adapter math runs in the adapter's dtype
        if layer.is_conv:
            # PEFT's lora_A conv copies the base kernel, stride and padding, not its dilation or groups
            h = layer.conv(x, a, dilation=1, groups=1)
            return layer.conv(h, b, stride=1, padding=0, dilation=1)
        # shrink then expand: T·r·(d_in + d_out), never a d_out×d_in matrix
        return F.linear(F.linear(x, a), b)

    # -- evaluation ----------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        return _counted(lambda q: scaling_of(spec, layer) * self._low_rank(spec, layer, q, x, training), layer, p)

    def forward(self, spec, layer, p, x, weight, bias, training):
        out = self._forward(spec, layer, p, x, weight, bias, training)
        return out.to(weight.dtype)  # adapters in another dtype (e.g. float32 on bf16): PEFT casts back

    def _forward(self, spec, layer, p, x, weight, bias, training):
        if not spec.use_dora:
            return super().forward(spec, layer, p, x, weight, bias, training)
        s = scaling_of(spec, layer)
        norm = self._weight_norm(spec, layer, weight, self._dora_lora_weight(layer, p, weight.shape).detach()).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.kind == "embedding":
            return scale * layer.base(x, weight, None) + scale * s * self._low_rank(spec, layer, p, x, training)
        scale = scale if layer.is_conv else scale.view(1, -1)
        base_out = layer.base(x, weight, bias)
        bias_b = 0 if bias is None else layer.channel_view(bias)
        if spec.dropout and training:
            # PEFT: with active dropout the DoRA term re-runs the base op on the dropped input
            xd = F.dropout(x, spec.dropout, training)
            base_d = layer.base(xd, weight, None)
            low = self._low_rank(spec.replace(dropout=0.0), layer, p, xd, training)
            return base_out + (scale - 1) * base_d + scale * low * s
        low = self._low_rank(spec, layer, p, x, training)
        return base_out + (scale - 1) * (base_out - bias_b) + scale * low * s

    def delta_weight(self, spec, layer, p, weight):
        return _counted(lambda q: scaling_of(spec, layer) * self._lora_weight(layer, q, weight.shape), layer, p)

    def merged_weight(self, spec, layer, p, weight, bias):
        if layer.is_conv and layer.groups > 1:
            raise AdapterError(f"{layer.fqn}: PEFT cannot merge LoRA into a conv with groups > 1; neither can we.")
        merged = weight + self.delta_weight(spec, layer, p, weight).to(weight.dtype)
        if not spec.use_dora:
            return merged, bias
        norm = self._weight_norm(spec, layer, weight, self._dora_lora_weight(layer, p, weight.shape)).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.is_conv:
            return merged * scale.transpose(0, 1), bias
        if layer.kind == "embedding":
            return merged * scale.view(1, -1), bias
        return merged * scale.view(-1, 1), bias

    def weight_side_ok(self, spec, training):
        return not (training and spec.dropout)  # (a weight-only layer would allow it; the plan stays simple)

    def cost(self, spec, layer, tokens):
        r = rank_of(spec, layer)
        if layer.kind != "linear":
            return {"activation": 0}
        d_in, d_out = layer.in_features, layer.out_features
        act = matmul_flops(tokens, d_in, r) + matmul_flops(tokens, r, d_out) + 2 * tokens * d_out
        weight = matmul_flops(d_out, r, d_in) + 2 * d_out * d_in
        if spec.use_dora:
            norm = matmul_flops(d_out, r, d_in) + 3 * d_out * d_in
            return {"activation": act + norm + 3 * tokens * d_out, "weight": weight + norm + d_out * d_in}
        return {"activation": act, "weight": weight}

    def scaling(self, spec: LoRA, layer: Layer) -> float:
        return scaling_of(spec, layer)

    # -- lowering hooks ----------------------------------------------------------------------
    def kernel_operands(self, spec, layer, p, training):
        # the fused kernels compute base + s·(x Aᵀ)Bᵀ: Linear / Conv1D, no DoRA, no active dropout
        if layer.kind != "linear" or spec.use_dora or (training and spec.dropout) or layer.delta_factor != 1:
            return None
        return p["lora_A"], p["lora_B"], scaling_of(spec, layer)

    def fold_hotswap(self, old_spec, new_spec, layer, p):
        # s_old · (x Aᵀ)(B · s_new/s_old)ᵀ = s_new · (x Aᵀ) Bᵀ: one rounding, in place (same tensor)
        ratio = scaling_of(new_spec, layer) / scaling_of(old_spec, layer)
        if ratio != 1.0:
            b = p["lora_B"]
            with torch.no_grad():
                b.copy_((b.double() * ratio).to(b.dtype))

    # -- PEFT interop ----------------------------------------------------------------------
    def peft_key(self, param_name, layer):
        if layer.kind == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}.get(param_name, param_name)
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}.get(param_name, param_name)

    def to_peft_config(self, spec: LoRA) -> dict:
        return {
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "use_rslora": spec.rslora,
            "use_dora": spec.use_dora,
            "init_lora_weights": spec.init,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
            "bias": "none",
            "fan_in_fan_out": False,
        }

    def from_peft_config(self, config: dict) -> LoRA:
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise AdapterError("LoRA checkpoint trains biases (bias != 'none' / lora_bias); not supported yet.")
        init = config.get("init_lora_weights", True)
        return LoRA(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False),
            init=init,
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )


register(LoRAMethod())
