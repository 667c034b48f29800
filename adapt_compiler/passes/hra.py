"""HRA (Householder reflection adaptation), matching PEFT 0.21.2 `tuners/hra`.

    ûᵢ = uᵢ / ‖uᵢ‖          H = H₀ H₁ ⋯ H_{r−1},  Hᵢ = I − 2 ûᵢ ûᵢᵀ        (hra_u: (d_in[·kh·kw], r))
    apply_GS: Û = Gram–Schmidt(U) (PEFT's loop order), H = I − 2 Û Ûᵀ
    y = x · Hᵀ · Wᵀ + b       W' = W · H

Evaluation orders (never the dense d×d H that PEFT builds every call):
* activation: x·Hᵀ = x·H_{r−1}⋯H₀ in the compact WY form H = I − Û T Ûᵀ (T: r×r upper triangular,
  `compact_wy`), x − (x·Û)(ÛT)ᵀ: two thin matmuls, 4·T·d·r FLOPs, one pass over x instead of r
  rank-1 passes (apply_GS: T = 2I, x − 2(x·Û)Ûᵀ). Û and ÛT depend on the parameters only, so the
  lowering builds them for all same-shaped layers in one batched call (`prepare_group`);
* weight: W' = W·H₀⋯H_{r−1}, the same form on W's rows, 4·d_out·d·r FLOPs.

Init (PEFT): r even -> r/2 kaiming columns each repeated twice, so consecutive reflections cancel
and H = I; r odd -> kaiming (H ≠ I, with PEFT's warning). With apply_GS, H = I − 2ÛÛᵀ is never I.

Regulariser (the HRA paper's, not in PEFT): `m.regularization_loss()` = λ Σ_layers ‖I − ÛᵀÛ‖_F,
λ = orth_reg_weight; add it to the task loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..spec import AdapterSpec, check_positive
from .method import PREPARED, AdapterError, Layer, WeightMethod
from ._rotation import check_orthogonal_layer, evaluate_rotated, merged_rows, rotated_dim
from .registry import register


@dataclass
class HRA(AdapterSpec):
    method = "hra"
    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True  # True: paired columns (H = I for even r); False: kaiming
    orth_reg_weight: float = 1e-4  # λ of regularization_loss(); ours only (PEFT has no regulariser)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        if self.init_weights not in (True, False):
            raise AdapterError(f"HRA: init_weights={self.init_weights!r} must be True or False.")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise AdapterError(f"HRA: orth_reg_weight={self.orth_reg_weight!r} must be a number >= 0.")


def gram_schmidt(u):
    """PEFT's loop: column i minus its projections on the already-normalised columns 0..i−1, normalised."""
    cols = [u[:, :1] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        ui = u[:, i : i + 1]
        for w in cols:
            ui = ui - (w.t() @ ui) * w
        cols.append(ui / ui.norm())
    return torch.cat(cols, dim=1)  # (d, r), orthonormal columns


def compact_wy(u: torch.Tensor) -> torch.Tensor:
    """T of the compact WY form H₀H₁⋯H_{r−1} = I − U T Uᵀ for unit columns uᵢ (Hᵢ = I − 2uᵢuᵢᵀ).

    T is upper triangular with T⁻¹ = ½·I + strict_upper(UᵀU) (Schreiber & Van Loan's forward
    accumulation, closed form). Solved in float32 at least: half-precision triangular solves are
    not available on every backend and r is small. Batched over leading dims of u (…, d, r).
    """
    wide = u if u.dtype in (torch.float32, torch.float64) else u.float()
    g = wide.transpose(-2, -1) @ wide
    eye = torch.eye(g.shape[-1], dtype=wide.dtype, device=u.device)
    t = torch.linalg.solve_triangular(torch.triu(g, diagonal=1) + 0.5 * eye, eye.expand_as(g), upper=True)
    return t.to(u.dtype)


def wy_factors(u: torch.Tensor) -> torch.Tensor:
    """(…, d, r) -> (…, 2, d, r): Û (unit columns) and Û·T, so H = I − Û T Ûᵀ = I − (ÛT) Ûᵀ."""
    u = u / u.norm(dim=-2, keepdim=True)
    return torch.stack([u, u @ compact_wy(u)], dim=-3)


class HRAMethod(WeightMethod):
    name = "hra"
    peft_type = "HRA"
    prefix = "hra_"
    spec_type = HRA
    kinds = frozenset({"linear", "conv2d"})
    merge_kind = "multiplicative"

    def check(self, spec: HRA, layer: Layer) -> None:
        super().check(spec, layer)
        check_orthogonal_layer("HRA", layer)

    def init_params(self, spec: HRA, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        d, r = rotated_dim(layer), spec.r
        if spec.init_weights and r % 2 == 0:
            half = torch.zeros(d, r // 2)
            torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)  # ûᵢ = ûᵢ₊₁: each pair of reflections cancels
        else:
            if spec.init_weights:
                warnings.warn(f"{layer.fqn}: HRA r={r} is odd, so the paired init (adapted == base) is impossible.")
            u = torch.empty(d, r)
            torch.nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        return {"hra_u": u.to(weight.dtype)}

    # -- the reflections -----------------------------------------------------------------------
    @staticmethod
    def _reflect(h, factors, transpose: bool):
        """Row vectors h (…, d) times H (transpose=False) or Hᵀ (transpose=True), H = I − Û T Ûᵀ.

        Two thin GEMMs instead of r memory-bound rank-1 passes over h (and r saved copies of h).
        `factors` is (2, d, r): Û and ÛT (`wy_factors`); apply_GS passes Q and 2Q (T = 2I).
        """
        u, ut = factors[0], factors[1]
        if transpose:  # h·Hᵀ = h − (h·Û)(ÛT)ᵀ
            return h - (h @ u) @ ut.transpose(-2, -1)
        return h - (h @ ut) @ u.transpose(-2, -1)  # h·H = h − (h·ÛT)Ûᵀ

    @staticmethod
    def _factors(spec: HRA, p, dtype) -> torch.Tensor:
        if PREPARED in p:  # built for several layers at once (group_key / prepare_group)
            return p[PREPARED].to(dtype)
        u = p["hra_u"].to(dtype)
        if spec.apply_GS:
            q = gram_schmidt(u)  # H symmetric: H = I − 2 Q Qᵀ
            return torch.stack([q, 2 * q])
        return wy_factors(u)

    def group_key(self, spec: HRA, layer, p, training):
        if spec.apply_GS:  # PEFT's sequential Gram–Schmidt loop: kept per layer
            return None
        return p["hra_u"].shape  # stacked, so (d, r) must agree

    def prepare_group(self, spec: HRA, ps, training):
        """Every layer's normalisation, ÛᵀÛ, triangular solve and ÛT as one batched op each."""
        return list(wy_factors(torch.stack([p["hra_u"] for p in ps])).unbind(0))

    def forward(self, spec, layer, p, x, weight, bias, training):
        factors = self._factors(spec, p, x.dtype)
        return evaluate_rotated(layer, x, weight, bias, lambda h: self._reflect(h, factors, transpose=True))

    def merged_weight(self, spec, layer, p, weight, bias):
        factors = self._factors(spec, p, weight.dtype)
        return merged_rows(weight, lambda w: self._reflect(w, factors, transpose=False)), bias

    def cost(self, spec, layer, tokens):
        d, d_out, r = rotated_dim(layer), layer.out_features, spec.r
        build = 2 * r * r * d if spec.apply_GS else 3 * d * r  # Gram–Schmidt / column norms
        return {"activation": build + 4 * tokens * d * r, "weight": build + 4 * d_out * d * r}

    def regularization_loss(self, spec: HRA, slots):
        """λ Σ ‖I − ÛᵀÛ‖_F over the adapted layers (Û: unit columns), pushing the uᵢ apart."""
        if not slots or not spec.orth_reg_weight:
            return None
        total = 0
        for _, p in slots:
            u = p["hra_u"]
            u = u / u.norm(dim=0)
            eye = torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
            total = total + torch.linalg.matrix_norm(eye - u.t() @ u)
        return spec.orth_reg_weight * total

    # -- PEFT interop ----------------------------------------------------------------------------
    def to_peft_config(self, spec: HRA) -> dict:
        return {"r": spec.r, "apply_GS": spec.apply_GS, "init_weights": spec.init_weights, "bias": "none"}

    def from_peft_config(self, config: dict) -> HRA:
        if config.get("bias", "none") != "none":
            raise AdapterError("HRA checkpoint trains biases (bias != 'none'); not supported.")
        return HRA(r=config.get("r", 8), apply_GS=config.get("apply_GS", False),
                   init_weights=bool(config.get("init_weights", True)))

    def spec_from_tensors(self, spec: HRA, tensors: dict) -> HRA:
        ranks = {t.shape[1] for k, t in tensors.items() if k.endswith("hra_u")}
        return spec.replace(r=ranks.pop()) if len(ranks) == 1 and ranks != {spec.r} else spec


register(HRAMethod())
