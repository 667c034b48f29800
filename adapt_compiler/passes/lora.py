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
from ._lora_init_loftq import check_loftq_config, loftq_weights
from ._patterns import pattern_value
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


@dataclass
class LoRA(AdapterSpec):
    method = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = False
    init: bool | str = True  # True (kaiming A, zero B) | "gaussian" | False (B not zero) | "loftq"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    loftq_config: dict = field(default_factory=dict)  # init="loftq": see _lora_init_loftq.py

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        check_probability(self, dropout=self.dropout)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterError(f"LoRA: alpha={self.alpha!r} must be a positive number (PEFT's lora_alpha).")
        if self.init not in (True, False, "gaussian", "loftq"):
            raise AdapterError(f"LoRA: init={self.init!r} is not supported; use True, False, 'gaussian' or 'loftq'.")
        if self.init == "loftq":
            check_loftq_config(self.loftq_config)
        elif self.loftq_config:
            raise AdapterError("LoRA: loftq_config is only read with init='loftq'; set init='loftq' or drop it.")


def rank_of(spec: LoRA, layer: Layer) -> int:
    return pattern_value(spec.rank_pattern, layer.fqn, spec.r)


def scaling_of(spec: LoRA, layer: Layer) -> float:
    r = rank_of(spec, layer)
    alpha = pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha)
    return alpha / math.sqrt(r) if spec.rslora else alpha / r


class LoRAMethod(WeightMethod):
    name = "lora"
    peft_type = "LORA"
    prefix = "lora_"
    spec_type = LoRA
    kinds = frozenset({"linear", "conv2d", "embedding"})
    # the scaling is folded into B (fold_hotswap); init is history; the compiled dropout p stays
    # (hotswap serves inference)
    hotswap_foldable = frozenset({"r", "alpha", "rslora", "rank_pattern", "alpha_pattern", "init", "dropout"})

    def check(self, spec: LoRA, layer: Layer) -> None:
        super().check(spec, layer)
        r = rank_of(spec, layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterShapeError(f"{layer.fqn}: LoRA r={r!r} (from rank_pattern) must be a positive integer.")
        if layer.kind == "conv2d" and r % layer.groups:
            raise AdapterShapeError(
                f"{layer.fqn}: LoRA rank r={r} must be divisible by the conv's groups={layer.groups}; "
                f"pick r as a multiple of {layer.groups}."
            )

    def init_params(self, spec: LoRA, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r = rank_of(spec, layer)
        dt = weight.dtype
        if layer.kind == "embedding":
            # PEFT: A zero, B normal (the other way round from Linear)
            a = torch.zeros(r, layer.weight_shape[0], dtype=dt)
            b = torch.randn(layer.weight_shape[1], r, dtype=dt)
            if spec.init is False:
                a = torch.randn_like(a)
        else:
            if layer.kind == "conv2d":
                a = torch.empty(r, layer.in_features, *layer.kernel_size, dtype=dt)
                b = torch.empty(layer.out_features, r // layer.groups, 1, 1, dtype=dt)
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
            if spec.init == "loftq":  # W − dequantize(W4) ≈ B·A (over a 4-bit base)
                a, b = (t.to(dt) for t in loftq_weights(spec, layer, weight, r))
        params = {"lora_A": a, "lora_B": b}
        if spec.use_dora:
            with torch.no_grad():
                params["lora_magnitude_vector"] = self._weight_norm(
                    spec, layer, weight, self._lora_weight(layer, params, weight.shape)
                ).to(dt)
        return params

    # -- the low-rank product ------------------------------------------------------------
    def _lora_weight(self, layer: Layer, p, weight_shape) -> torch.Tensor:
        """B·A in the canonical weight layout (unscaled)."""
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "embedding":
            return (b @ a).T  # (num, dim)
        if layer.kind == "conv2d":
            if layer.kernel_size == (1, 1):
                return (b.flatten(1) @ a.flatten(1))[:, :, None, None]
            # PEFT: conv(Aᵀ, B)ᵀ; exact for groups == 1
            return F.conv2d(a.transpose(0, 1), b).transpose(0, 1)
        return b @ a

    def _weight_norm(self, spec, layer: Layer, weight, lora_weight) -> torch.Tensor:
        w = weight + scaling_of(spec, layer) * lora_weight
        if layer.kind == "conv2d":
            return w.norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)  # (1, d_out, 1, 1)
        if layer.kind == "embedding":
            return torch.linalg.norm(w, dim=0)  # per embedding dim
        return torch.linalg.norm(w, dim=1)

    def _low_rank(self, spec, layer: Layer, p, x, training: bool) -> torch.Tensor:
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "embedding":
            return F.embedding(x, a.T, layer.padding_idx, layer.max_norm) @ b.T
        x = F.dropout(x, spec.dropout, training) if spec.dropout else x
        x = x.to(a.dtype)  # like PEFT: the adapter math runs in the adapter's dtype
        if layer.kind == "conv2d":
            h = F.conv2d(x, a, None, layer.stride, layer.padding)
            return F.conv2d(h, b, groups=layer.groups)
        # shrink then expand: T·r·(d_in + d_out), never a d_out×d_in matrix
        return F.linear(F.linear(x, a), b)

    # -- evaluation ----------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        return scaling_of(spec, layer) * self._low_rank(spec, layer, p, x, training)

    def forward(self, spec, layer, p, x, weight, bias, training):
        out = self._forward(spec, layer, p, x, weight, bias, training)
        return out.to(weight.dtype)  # adapters in another dtype (e.g. float32 on bf16): PEFT casts back

    def _forward(self, spec, layer, p, x, weight, bias, training):
        if not spec.use_dora:
            return super().forward(spec, layer, p, x, weight, bias, training)
        s = scaling_of(spec, layer)
        norm = self._weight_norm(spec, layer, weight, self._lora_weight(layer, p, weight.shape).detach()).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.kind == "embedding":
            return scale * layer.base(x, weight, None) + scale * s * self._low_rank(spec, layer, p, x, training)
        scale = scale if layer.kind == "conv2d" else scale.view(1, -1)
        base_out = layer.base(x, weight, bias)
        bias_b = 0 if bias is None else (bias.view(1, -1, 1, 1) if layer.kind == "conv2d" else bias)
        if spec.dropout and training:
            # PEFT: with active dropout the DoRA term re-runs the base op on the dropped input
            xd = F.dropout(x, spec.dropout, training)
            base_d = layer.base(xd, weight, None)
            low = self._low_rank(spec.replace(dropout=0.0), layer, p, xd, training)
            return base_out + (scale - 1) * base_d + scale * low * s
        low = self._low_rank(spec, layer, p, x, training)
        return base_out + (scale - 1) * (base_out - bias_b) + scale * low * s

    def delta_weight(self, spec, layer, p, weight):
        return scaling_of(spec, layer) * self._lora_weight(layer, p, weight.shape)

    def merged_weight(self, spec, layer, p, weight, bias):
        if layer.kind == "conv2d" and layer.groups > 1:
            raise AdapterError(f"{layer.fqn}: PEFT cannot merge LoRA into a conv with groups > 1; neither can we.")
        merged = weight + self.delta_weight(spec, layer, p, weight).to(weight.dtype)
        if not spec.use_dora:
            return merged, bias
        norm = self._weight_norm(spec, layer, weight, self._lora_weight(layer, p, weight.shape)).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.kind == "conv2d":
            return merged * scale.transpose(0, 1), bias
        if layer.kind == "embedding":
            return merged * scale.view(1, -1), bias
        return merged * scale.view(-1, 1), bias

    def weight_side_ok(self, spec, training):
        return not (training and spec.dropout)

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
        if layer.kind != "linear" or spec.use_dora or (training and spec.dropout):
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
            # LoftQ's result is in the saved tensors (and PEFT's "loftq" needs scipy to even load)
            "init_lora_weights": True if spec.init == "loftq" else spec.init,
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
            init=init if init in (True, False, "gaussian") else True,
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )


register(LoRAMethod())
