"""LoKr (low-rank Kronecker product), matching PEFT 0.21.2 `tuners/lokr`.

    ΔW = s · W1 ⊗ W2            s = alpha / r (also when both factors are full-rank: PEFT's convention)
    y  = x Wᵀ + b + x ΔWᵀ

Factor shapes follow PEFT's rules: (a, b) = factorization(d_out, f), (c, d) = factorization(d_in, f),
f = decompose_factor, d_in counted per conv group. W1 is (a, c), W2 is (b, d[, kh, kw]).
    W1 = lokr_w1 (a, c), or lokr_w1_a (a, r) · lokr_w1_b (r, c) if decompose_both and r < max(a, c)/2
    W2 = lokr_w2 (b, d[, kh, kw]) if r ≥ max(b, d)/2, else lokr_w2_a (b, r) · lokr_w2_b (r, d[·kh·kw]);
         Conv2d with use_effective_conv2d (kernel ≠ 1×1): CP form
         W2 = einsum("ijuv,ip,jq->pquv", lokr_t2 (r, r, kh, kw), lokr_w2_a (r, b), lokr_w2_b (r, d))

Evaluation orders (PEFT materialises the d_out×d_in Kronecker product and runs a second full GEMM):
  * "weight": fold ΔW into the base weight, one GEMM x·(W + ΔW)ᵀ (cheap to build: d_out·d_in mults).
  * "activation": never materialise the product. With x reshaped to X (…, c, d),
        (W1 ⊗ W2)·vec(X) = vec(W1 · X · W2ᵀ)   i.e.   Y (…, a, b) = s · W1 · (X · W2ᵀ)
    T·b·c·(d + a) FLOPs instead of T·a·b·c·d (and T·c·r·(d + b) for the X·W2ᵀ step when W2 is
    low-rank). Conv2d (groups = 1): the c input-channel blocks are folded into the batch, convolved
    with W2 (b, d, kh, kw), then mixed by W1. In training it is almost always the cheaper order,
    because the weight fold also needs dW' = gᵀx in the backward (a full GEMM).

Dropout (training only) as in LoHa (see loha.py, same RNG-order note), except that the rank-dropout
mask is rescaled by 1/mean only when rank_dropout_scale=True (PEFT's default False keeps it 0/1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..spec import AdapterSpec, check_positive, check_probability
from ._lycoris import apply_masks, dropout_masks
from ._patterns import pattern_value
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


@dataclass
class LoKr(AdapterSpec):
    method = "lokr"
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True  # True: W1 = 0 | "lycoris": W2 = 0 | False: all kaiming
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        check_probability(self, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise AdapterError(f"LoKr: alpha={self.alpha!r} must be a number (scaling = alpha / r).")
        if self.init_weights not in (True, False, "lycoris"):
            raise AdapterError(f"LoKr: init_weights={self.init_weights!r} must be True, False or 'lycoris'.")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or not (f == -1 or f > 0):
            raise AdapterError(f"LoKr: decompose_factor={f!r} must be -1 (near √n) or a positive integer.")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT/LyCORIS: (m, n), m ≤ n, m·n = dimension; m = factor if it divides, else the divisor pair
    closest to √dimension with m ≤ factor (factor = -1: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@dataclass(frozen=True)
class _Layout:
    a: int  # W1 rows    d_out = a·b
    b: int  # W2 rows
    c: int  # W1 cols    d_in (per group) = c·d
    d: int  # W2 cols
    r: int
    k: tuple  # conv kernel (kh, kw); () for Linear
    full_w1: bool
    full_w2: bool
    cp: bool  # W2 in CP (Tucker) form


class LoKrMethod(WeightMethod):
    name = "lokr"
    peft_type = "LOKR"
    prefix = "lokr_"
    spec_type = LoKr
    kinds = frozenset({"linear", "conv1d", "conv2d"})  # PEFT: Linear, Conv1d, Conv2d

    # -- shapes and init -------------------------------------------------------------------
    def rank(self, spec: LoKr, layer: Layer) -> int:
        return pattern_value(spec.rank_pattern, layer.fqn, spec.r)

    def scaling(self, spec: LoKr, layer: Layer) -> float:
        return pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha) / self.rank(spec, layer)

    def layout(self, spec: LoKr, layer: Layer) -> _Layout:
        r = self.rank(spec, layer)
        a, b = factorization(layer.out_features, spec.decompose_factor)
        c, d = factorization(layer.weight_shape[1], spec.decompose_factor)  # conv: d_in / groups
        full_w1 = not (spec.decompose_both and r < max(a, c) / 2)
        full_w2 = not (r < max(b, d) / 2)
        k = layer.kernel_size
        cp = (not full_w2) and spec.use_effective_conv2d and layer.is_conv and not layer.pointwise
        return _Layout(a, b, c, d, r, k, full_w1, full_w2, cp)

    def check(self, spec: LoKr, layer: Layer) -> None:
        super().check(spec, layer)
        if layer.transposed:
            raise AdapterShapeError(
                f"{layer.fqn}: PEFT's LoKr does not support HF Conv1D layers (so its checkpoints could not "
                f"be shared); exclude it from `targets` or use LoRA for it."
            )
        r = self.rank(spec, layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterShapeError(f"{layer.fqn}: LoKr rank {r!r} (rank_pattern) must be > 0.")

    def param_shapes(self, spec: LoKr, layer: Layer) -> dict[str, tuple]:
        L = self.layout(spec, layer)
        kk = math.prod(L.k) if L.k else 1
        shapes = {"lokr_w1": (L.a, L.c)} if L.full_w1 else {"lokr_w1_a": (L.a, L.r), "lokr_w1_b": (L.r, L.c)}
        if L.full_w2:
            shapes["lokr_w2"] = (L.b, L.d, *L.k)
        elif L.cp:
            # PEFT keeps the core 4-D: Conv1d's is (r, r, k, 1)
            shapes.update(lokr_t2=(L.r, L.r, *(*L.k, 1)[:2]), lokr_w2_a=(L.r, L.b), lokr_w2_b=(L.r, L.d))
        else:
            shapes.update(lokr_w2_a=(L.b, L.r), lokr_w2_b=(L.r, L.d * kk))
        return shapes

    def init_params(self, spec: LoKr, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        # PEFT: True -> W1 (or w1_a) = 0; "lycoris" -> W2 (or w2_b) = 0; False -> nothing zero
        zeros = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}, False: set()}
        zero = zeros[spec.init_weights]
        params = {}
        for name, shape in self.param_shapes(spec, layer).items():
            t = torch.empty(shape, dtype=weight.dtype)
            if name in zero:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            params[name] = t
        return params

    # -- factors ---------------------------------------------------------------------------------
    def w1(self, p, dtype) -> torch.Tensor:
        if "lokr_w1" in p:
            return p["lokr_w1"].to(dtype)  # (a, c)
        return p["lokr_w1_a"].to(dtype) @ p["lokr_w1_b"].to(dtype)  # (a, r)(r, c)

    def w2(self, layer: Layer, p, dtype) -> torch.Tensor:
        """W2 as (b, d) for Linear, (b, d, *kernel) for a conv."""
        if "lokr_w2" in p:
            return p["lokr_w2"].to(dtype)
        a, b = p["lokr_w2_a"].to(dtype), p["lokr_w2_b"].to(dtype)
        if "lokr_t2" in p:  # CP: w2[p,q,u,v] = Σ_ij t[i,j,u,v] a[i,p] b[j,q]
            w2 = torch.einsum("ijuv,ip,jq->pquv", p["lokr_t2"].to(dtype), a, b)
            return w2.reshape(*w2.shape[:2], *layer.kernel_size)  # Conv1d: drop the core's trailing 1
        w2 = a @ b  # (b, r)(r, d·kernel)
        if layer.is_conv:
            w2 = w2.reshape(w2.shape[0], -1, *layer.kernel_size)
        return w2

    def delta_weight(self, spec, layer, p, weight):
        """ΔW = s · W1 ⊗ W2: ΔW[i·b + j, k·d + l, …] = s · W1[i, k] · W2[j, l, …]."""
        w1 = self.w1(p, weight.dtype) * self.scaling(spec, layer)  # s folded into the small factor
        w2 = self.w2(layer, p, weight.dtype)
        extra = w2.dim() - 2  # kernel dims
        a, c = w1.shape
        b, d = w2.shape[:2]
        w1 = w1.reshape(a, 1, c, 1, *[1] * extra)
        kron = w1 * w2.reshape(1, b, 1, d, *w2.shape[2:])  # (a, b, c, d[, kh, kw])
        return kron.reshape(layer.weight_shape)

    # -- evaluation ------------------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        s = self.scaling(spec, layer)
        w1 = self.w1(p, x.dtype) * s  # (a, c)
        a, c = w1.shape
        if layer.is_conv:
            if layer.groups > 1:
                # the Kronecker blocks do not line up with the conv groups: materialise (PEFT's way)
                out = layer.conv(x, self.delta_weight(spec, layer, p, weight).to(x.dtype))
            else:
                w2 = self.w2(layer, p, x.dtype)  # (b, d, kh, kw)
                n, cd, *spatial = x.shape
                z = layer.conv(x.reshape(n * c, cd // c, *spatial), w2)  # (N·c, b, *out): one conv per block
                z = z.reshape(n, c, *z.shape[1:])  # (N, c, b, *out)
                out = torch.einsum("ak,nkb...->nab...", w1, z).flatten(1, 2)  # (N, a·b, *out)
        else:
            lead = x.shape[:-1]
            xx = x.reshape(*lead, c, -1)  # (…, c, d)
            if "lokr_w2" in p:
                z = xx @ p["lokr_w2"].to(x.dtype).T  # (…, c, b)
            else:  # low rank: (…, c, d) -> (…, c, r) -> (…, c, b)
                z = (xx @ p["lokr_w2_b"].to(x.dtype).T) @ p["lokr_w2_a"].to(x.dtype).T
            out = torch.einsum("ak,...kb->...ab", w1, z).flatten(-2)  # (…, a·b): W1 · X · W2ᵀ
        keep, rows = dropout_masks(spec, layer, training, x.device, rescale=spec.rank_dropout_scale)
        return apply_masks(out, layer, keep, rows)

    def weight_side_ok(self, spec, training):
        # merged_weight has no training flag, so dropout masks only exist on the activation side
        return not (training and (spec.rank_dropout or spec.module_dropout))

    def cost(self, spec, layer, tokens):
        """Forward FLOPs over the base op (lowering/cost.py adds traffic and the training backward)."""
        L = self.layout(spec, layer)
        kk = math.prod(L.k) if L.k else 1
        d_out, f = layer.out_features, math.prod(layer.weight_shape[1:])
        t = tokens / math.prod(layer.stride) if layer.is_conv else tokens  # output positions
        w1_build = 0 if L.full_w1 else matmul_flops(L.a, L.r, L.c)
        if L.full_w2:
            w2_build = 0
        elif L.cp:
            w2_build = matmul_flops(L.r, L.r, L.d * kk) + matmul_flops(L.b, L.r, L.d * kk)
        else:
            w2_build = matmul_flops(L.b, L.r, L.d * kk)
        build = w1_build + w2_build + d_out * f  # + the Kronecker product's d_out·fan_in mults
        mix = matmul_flops(L.a, L.c, t * L.b)  # W1 · Z
        if layer.is_conv and layer.groups > 1:
            act_build, act = build, matmul_flops(t, d_out, f)
        elif layer.is_conv:
            act_build, act = w1_build + w2_build, matmul_flops(t * L.c, L.d * kk, L.b) + mix
        elif L.full_w2:
            act_build, act = w1_build, matmul_flops(t * L.c, L.d, L.b) + mix
        else:
            act_build, act = w1_build, matmul_flops(t * L.c, L.d, L.r) + matmul_flops(t * L.c, L.r, L.b) + mix
        act = act + t * d_out  # the add to the base output
        return {"activation": act_build + act, "weight": build + d_out * f}

    # -- PEFT interop ---------------------------------------------------------------------------
    def to_peft_config(self, spec: LoKr) -> dict:
        return {
            "r": spec.r,
            "alpha": spec.alpha,
            "rank_dropout": spec.rank_dropout,
            "module_dropout": spec.module_dropout,
            "use_effective_conv2d": spec.use_effective_conv2d,
            "decompose_both": spec.decompose_both,
            "decompose_factor": spec.decompose_factor,
            "rank_dropout_scale": spec.rank_dropout_scale,
            "init_weights": spec.init_weights,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
        }

    def from_peft_config(self, config: dict) -> LoKr:
        init = config.get("init_weights", True)
        return LoKr(
            r=config.get("r", 8),
            alpha=config.get("alpha", 8),
            rank_dropout=config.get("rank_dropout", 0.0),
            module_dropout=config.get("module_dropout", 0.0),
            use_effective_conv2d=config.get("use_effective_conv2d", False),
            decompose_both=config.get("decompose_both", False),
            decompose_factor=config.get("decompose_factor", -1),
            rank_dropout_scale=config.get("rank_dropout_scale", False),
            init_weights=init if init in (True, False, "lycoris") else True,
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )


register(LoKrMethod())
