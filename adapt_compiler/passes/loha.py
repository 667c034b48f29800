"""LoHa (low-rank Hadamard product), matching PEFT 0.21.2 `tuners/loha`.

    ΔW = s · (W1a·W1b) ⊙ (W2a·W2b)            s = alpha / r
    y  = x Wᵀ + b + x ΔWᵀ

Parameters (PEFT names and shapes), fan_in = d_in (Linear) or d_in/groups·kernel (Conv1d, Conv2d):
    hada_w1_a, hada_w2_a (d_out, r)   hada_w1_b, hada_w2_b (r, fan_in)
Conv1d/Conv2d with use_effective_conv2d and a kernel other than 1 (FedPara's Tucker form):
    hada_t1, hada_t2 (r, r, kh, kw) (Conv1d: (r, r, k, 1), PEFT's layout)   hada_w*_a (r, d_out)   hada_w*_b (r, d_in/groups)
    rebuild_k = einsum("ijuv,jc,io->ocuv", t_k, w_k_b, w_k_a),  ΔW = s · rebuild_1 ⊙ rebuild_2

Evaluation orders (PEFT always builds ΔW and then runs a second full-size GEMM/conv):
  * "weight": fold ΔW into the base weight, one GEMM x·(W + ΔW)ᵀ. Cheapest for large token counts.
  * "activation": the Hadamard product of two rank-r matrices is a rank-r² matrix with Khatri-Rao
    factors, (A1B1) ⊙ (A2B2) = P·Q with P[:, (i,j)] = A1[:, i]·A2[:, j] and Q[(i,j), :] = B1[i]·B2[j],
    so x ΔWᵀ = (x Qᵀ) Pᵀ costs T·r²·(d_in + d_out) and never builds a d_out×d_in matrix. Cheapest for
    few tokens (decoding) and as the per-adapter `delta` when several adapters are summed.

Training-only dropout, as PEFT defines it (both act on ΔW's output rows, so on the output channels):
  * module_dropout p_m: the whole adapter is skipped unless u > p_m, u ~ U[0,1) (one draw per call).
  * rank_dropout p_r: output row o is kept iff u_o > p_r; kept rows are scaled by 1/mean(mask).
PEFT draws u with a Python-level `torch.rand(1) > p` branch (which breaks torch.export); we multiply
by the 0/1 tensor instead, so train graphs trace. RNG order: PEFT draws rand(1), then rand(d_out)
only if the module was kept; we always draw both (when the respective dropout is on, plus rand(1)
whenever rank_dropout is on, to stay in step with PEFT). So with both dropouts > 0 our random stream
differs from PEFT's after the first dropped module; with only one of them on it is identical (CPU).
When every row is dropped PEFT divides 0 by 0 (NaN); we return 0 for that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import AdapterSpec, check_positive, check_probability
from ._lycoris import apply_masks, dropout_masks
from ._patterns import pattern_value
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


@dataclass
class LoHa(AdapterSpec):
    method = "loha"
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True  # True: w2_b = 0 (identity at init); False: all kaiming
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        check_probability(self, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise AdapterError(f"LoHa: alpha={self.alpha!r} must be a number (scaling = alpha / r).")
        if not isinstance(self.init_weights, bool):
            raise AdapterError(f"LoHa: init_weights={self.init_weights!r} must be True or False.")


class LoHaMethod(WeightMethod):
    name = "loha"
    peft_type = "LOHA"
    prefix = "hada_"
    spec_type = LoHa
    kinds = frozenset({"linear", "conv1d", "conv2d"})  # PEFT: Linear, Conv1d, Conv2d

    # -- shapes and init -------------------------------------------------------------------
    def rank(self, spec: LoHa, layer: Layer) -> int:
        return pattern_value(spec.rank_pattern, layer.fqn, spec.r)

    def scaling(self, spec: LoHa, layer: Layer) -> float:
        return pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha) / self.rank(spec, layer)

    def effective(self, spec: LoHa, layer: Layer) -> bool:
        # PEFT turns the Tucker form off for 1×1 (and Conv1d k=1) kernels: they are plain matmuls
        return spec.use_effective_conv2d and layer.is_conv and not layer.pointwise

    def fan_in(self, layer: Layer) -> int:
        """Columns of the flattened ΔW: d_in, or d_in/groups·kh·kw for a conv."""
        return math.prod(layer.weight_shape[1:])

    def check(self, spec: LoHa, layer: Layer) -> None:
        super().check(spec, layer)
        if layer.transposed:
            raise AdapterShapeError(
                f"{layer.fqn}: PEFT's LoHa does not support HF Conv1D layers (so its checkpoints could not "
                f"be shared); exclude it from `targets` or use LoRA for it."
            )
        r = self.rank(spec, layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterShapeError(f"{layer.fqn}: LoHa rank {r!r} (rank_pattern) must be > 0.")

    def init_params(self, spec: LoHa, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r, dt, d_out = self.rank(spec, layer), weight.dtype, layer.out_features
        if self.effective(spec, layer):
            k = (*layer.kernel_size, 1)[:2]  # PEFT keeps the core 4-D: Conv1d's is (r, r, k, 1)
            c = layer.weight_shape[1]  # d_in / groups
            shapes = {"hada_w1_a": (r, d_out), "hada_w1_b": (r, c), "hada_w2_a": (r, d_out),
                      "hada_w2_b": (r, c), "hada_t1": (r, r, *k), "hada_t2": (r, r, *k)}
        else:
            f = self.fan_in(layer)
            shapes = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, f),
                      "hada_w2_a": (d_out, r), "hada_w2_b": (r, f)}
        params = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=dt)
            if name == "hada_w2_b" and spec.init_weights:
                nn.init.zeros_(t)  # ΔW = 0 at init
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            params[name] = t
        return params

    # -- the two forms of ΔW ------------------------------------------------------------------
    def _modes(self, p, dtype):
        """Per Hadamard factor k: A_k (d_out, r) and M_k (r, fan_in…) with rebuild_k = A_k · M_k."""
        out = []
        for k in ("1", "2"):
            a, b = p[f"hada_w{k}_a"].to(dtype), p[f"hada_w{k}_b"].to(dtype)
            if f"hada_t{k}" in p:
                t = p[f"hada_t{k}"].to(dtype)  # (r, r, kh, kw)
                # Tucker: rebuild[o,c,u,v] = Σ_i a[i,o] · (Σ_j t[i,j,u,v] b[j,c])
                out.append((a.T, torch.einsum("ijuv,jc->icuv", t, b)))  # (d_out, r), (r, c, kh, kw)
            else:
                out.append((a, b))  # (d_out, r), (r, fan_in)
        return out

    def delta_weight(self, spec, layer, p, weight):
        """ΔW = s · rebuild_1 ⊙ rebuild_2 in the canonical weight layout."""
        (a1, m1), (a2, m2) = self._modes(p, weight.dtype)
        s = self.scaling(spec, layer)
        # s folded into the small A1 instead of a pass over the d_out×d_in product
        w1 = (a1 * s) @ m1.flatten(1)  # (d_out, fan_in)
        w2 = a2 @ m2.flatten(1)  # (d_out, fan_in)
        return (w1 * w2).reshape(layer.weight_shape)

    def khatri_rao(self, spec, layer, p, dtype):
        """P (d_out, r²) and Q (r², fan_in…) with P·Q = ΔW (scaling folded into P)."""
        (a1, m1), (a2, m2) = self._modes(p, dtype)
        d_out, r1, r2 = a1.shape[0], a1.shape[1], a2.shape[1]
        P = (a1[:, :, None] * a2[:, None, :]).reshape(d_out, r1 * r2) * self.scaling(spec, layer)
        Q = (m1[:, None] * m2[None, :]).reshape(r1 * r2, *m1.shape[1:])  # rows (i, j): m1[i] ⊙ m2[j]
        return P, Q

    # -- evaluation --------------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        P, Q = self.khatri_rao(spec, layer, p, x.dtype)
        if layer.is_conv:
            g, ones = layer.groups, [1] * layer.spatial
            # each group sees its own d_in/g channels: Q repeated per group, P as a grouped 1×1 conv
            q = Q.reshape(Q.shape[0], *layer.weight_shape[1:]).repeat(g, 1, *ones)  # (g·r², d_in/g, *k)
            h = layer.conv(x, q)  # (N, g·r², *spatial')
            out = layer.conv(h, P.reshape(*P.shape, *ones), stride=1, padding=0, dilation=1)  # (N, d_out, ...)
        else:
            out = F.linear(F.linear(x, Q), P)  # (…, d_in) -> (…, r²) -> (…, d_out)
        keep, rows = dropout_masks(spec, layer, training, x.device)
        return apply_masks(out, layer, keep, rows)

    def weight_side_ok(self, spec, training):
        # merged_weight has no training flag, so dropout masks only exist on the activation side
        return not (training and (spec.rank_dropout or spec.module_dropout))

    def cost(self, spec, layer, tokens):
        """Forward FLOPs over the base op (lowering/cost.py adds traffic and the training backward)."""
        r, d_out, f = self.rank(spec, layer), layer.out_features, self.fan_in(layer)
        g = layer.groups if layer.is_conv else 1
        t = tokens / math.prod(layer.stride) if layer.is_conv else tokens  # output positions
        build = 2 * matmul_flops(d_out, r, f) + d_out * f  # two rank-r products and their ⊙
        kr_build = r * r * (d_out + f)  # the Khatri-Rao factors P and Q
        if self.effective(spec, layer):
            tucker = 2 * matmul_flops(r, r, f)  # einsum t·b for both factors
            build, kr_build = build + tucker, kr_build + tucker
        act = matmul_flops(t, f, g * r * r) + matmul_flops(t, r * r, d_out) + t * d_out  # x·Qᵀ, ·Pᵀ, add
        return {"activation": kr_build + act, "weight": build + d_out * f}  # weight: + the W + ΔW add

    # -- PEFT interop ---------------------------------------------------------------------------
    def to_peft_config(self, spec: LoHa) -> dict:
        return {
            "r": spec.r,
            "alpha": spec.alpha,
            "rank_dropout": spec.rank_dropout,
            "module_dropout": spec.module_dropout,
            "use_effective_conv2d": spec.use_effective_conv2d,
            "init_weights": spec.init_weights,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
        }

    def from_peft_config(self, config: dict) -> LoHa:
        return LoHa(
            r=config.get("r", 8),
            alpha=config.get("alpha", 8),
            rank_dropout=config.get("rank_dropout", 0.0),
            module_dropout=config.get("module_dropout", 0.0),
            use_effective_conv2d=config.get("use_effective_conv2d", False),
            init_weights=bool(config.get("init_weights", True)),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )


register(LoHaMethod())
