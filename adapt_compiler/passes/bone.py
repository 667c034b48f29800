"""Bone / MiSS (block-sharing adaptation), matching PEFT 0.21.2 `tuners/miss`.

PEFT ≤ 0.18 called it Bone (peft_type "BONE", key `bone_block`); 0.19 removed Bone for MiSS
("MISS", `miss_block`) with the same math. Both load here (`.bone_` keys are renamed); we save MISS.
`ac.Bone` and `ac.MiSS` are this spec.

One trainable block M per layer, zero at init (so y = base), three modes:

* "balance" (PEFT init_weights=True), M (r, d_out): every r-wide input chunk shares M,
      ΔW[o, i] = M[i mod r, o]   ⇒   y = x Wᵀ + b + (Σ_j drop(x)[j·r:(j+1)·r]) M
  (x zero-padded to a multiple of r). Activation side: a chunk-sum of x then (…, r)@(r, d_out),
  O(T·(d_in + r·d_out)); never a dense ΔW.
* "mini", M (r, mini_r): the same with M̃ = M tiled to (r, d_out), ΔW[o, i] = M[i mod r, o mod mini_r].
* "bat" (Block Affine), M (d_out/r, r, r): W split into r×r blocks W_ij (i: output block),
      W'_ij = W_ij (I + M_i) + M_i
  nonlinear in W, so the layer runs as one GEMM with the rebuilt W' (PEFT does the same); there
  is no cheaper exact activation-side form (the per-block product W_ij·M_i is as big as W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import AdapterSpec, check_positive, check_probability
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register

MODES = ("balance", "bat", "mini")


@dataclass
class Bone(AdapterSpec):
    method = "bone"
    r: int = 64
    dropout: float = 0.0  # PEFT miss_dropout, on the adapter input (balance / mini; bat has none)
    mode: str = "balance"  # "balance" | "bat" | "mini"  (PEFT init_weights True | "bat" | "mini")
    bat: bool = False  # shorthand for mode="bat"
    mini_r: int = 1  # mini: width of M along d_out
    init: bool = True  # False: kaiming-random M (PEFT init_weights=False; balance only)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r, mini_r=self.mini_r)
        check_probability(self, dropout=self.dropout)
        if self.mode not in MODES:
            raise AdapterError(f"Bone: mode={self.mode!r} is not one of {MODES}.")
        if self.bat and self.mode == "mini":
            raise AdapterError("Bone: bat=True and mode='mini' exclude each other; pick one mode.")
        if self.bat:
            self.mode = "bat"
        self.bat = self.mode == "bat"
        if not self.init and self.mode != "balance":
            raise AdapterError(f"Bone: init=False (random M) exists for mode='balance' only, not {self.mode!r}.")


class BoneMethod(WeightMethod):
    name = "bone"
    peft_type = "MISS"
    prefix = "miss_"
    spec_type = Bone
    kinds = frozenset({"linear"})

    def check(self, spec: Bone, layer: Layer) -> None:
        super().check(spec, layer)
        d_in, d_out, r = layer.in_features, layer.out_features, spec.r
        if layer.transposed:
            raise AdapterShapeError(
                f"{layer.fqn}: MiSS/Bone (as PEFT) adapts nn.Linear only, not HF Conv1D; "
                f"exclude it from `targets`."
            )
        if r > d_in:
            raise AdapterShapeError(
                f"{layer.fqn}: Bone r={r} is larger than in_features={d_in}; use r <= {d_in}."
            )
        if spec.mode == "bat" and (d_in % r or d_out % r):
            raise AdapterShapeError(
                f"{layer.fqn}: Bone 'bat' splits W ({d_out}x{d_in}) into r x r blocks, so in_features and "
                f"out_features must be divisible by r={r}; pick r dividing both "
                f"(e.g. {math.gcd(d_in, d_out)}) "
                f"or exclude the layer."
            )
        if spec.mode == "mini" and d_out % spec.mini_r:
            raise AdapterShapeError(
                f"{layer.fqn}: Bone 'mini' tiles M along out_features={d_out}, which must be divisible by "
                f"mini_r={spec.mini_r}; pick mini_r dividing {d_out}."
            )

    def init_params(self, spec: Bone, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r, d_out, dt = spec.r, layer.out_features, weight.dtype
        if spec.mode == "bat":
            return {"miss_block": torch.zeros(d_out // r, r, r, dtype=dt)}  # one r×r M_i per output block
        if spec.mode == "mini":
            return {"miss_block": torch.zeros(r, spec.mini_r, dtype=dt)}
        block = torch.zeros(r, d_out, dtype=dt)
        if not spec.init:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        return {"miss_block": block}

    # -- evaluation ----------------------------------------------------------------------
    def _shared_block(self, spec: Bone, layer: Layer, p) -> torch.Tensor:
        """(r, d_out): M, or mini's M tiled along d_out."""
        m = p["miss_block"]
        return m.repeat(1, layer.out_features // spec.mini_r) if spec.mode == "mini" else m

    def _bat_delta(self, p, weight) -> torch.Tensor:
        # ΔW_ij = W_ij M_i + M_i  (so W' = W_ij (I + M_i) + M_i), PEFT's op order
        m = p["miss_block"].to(weight.dtype)  # (d_out/r, r, r)
        r = m.shape[-1]
        d_out, d_in = weight.shape
        # (d_in/r, d_out/r, r, r): w[j, i] = W_ij
        w = weight.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)
        return (w @ m + m).permute(1, 2, 0, 3).reshape(d_out, d_in)

    def delta(self, spec, layer, p, x, weight, training):
        if spec.mode == "bat":
            return F.linear(x, self._bat_delta(p, weight))
        m = self._shared_block(spec, layer, p).to(x.dtype)  # (r, d_out)
        r = m.shape[0]
        if x.shape[-1] % r:  # zero-pad d_in to a multiple of r (PEFT pads before dropout)
            x = F.pad(x, (0, r - x.shape[-1] % r))
        x = F.dropout(x, spec.dropout, training) if spec.dropout else x
        chunks = x.reshape(*x.shape[:-1], x.shape[-1] // r, r)  # (…, d_in/r, r)
        return torch.sum(chunks, dim=-2) @ m  # (…, r) @ (r, d_out)

    def forward(self, spec, layer, p, x, weight, bias, training):
        if spec.mode == "bat":  # nonlinear in W: one GEMM with W' (dropout is not applied, as in PEFT)
            return layer.base(x, weight + self._bat_delta(p, weight), bias)
        return super().forward(spec, layer, p, x, weight, bias, training)

    def delta_weight(self, spec, layer, p, weight):
        if spec.mode == "bat":
            return self._bat_delta(p, weight)
        m = self._shared_block(spec, layer, p)  # (r, d_out)
        r, d_in = m.shape[0], weight.shape[1]
        # ΔW[o, i] = M[i mod r, o]: Mᵀ tiled over the input chunks, the last one cut to the remainder
        return m.T.repeat(1, -(-d_in // r))[:, :d_in]

    def weight_side_ok(self, spec, training):
        return spec.mode == "bat" or not (training and spec.dropout)

    def reads_dense_weight(self, spec):
        return spec.mode == "bat"  # bat's update is built from W's own blocks

    def cost(self, spec, layer, tokens):
        d_in, d_out, r = layer.in_features, layer.out_features, spec.r
        if spec.mode == "bat":
            # (d_in/r)(d_out/r) products of r×r blocks = 2·d_out·d_in·r, + M_i, + W: only a weight side exists
            return {"weight": matmul_flops(d_out, r, d_in) + 2 * d_out * d_in}
        act = tokens * d_in + matmul_flops(tokens, r, d_out) + tokens * d_out  # chunk-sum, thin GEMM, add
        return {"activation": act, "weight": d_out * d_in}  # tiling Mᵀ is free; W + ΔW is one add

    # -- PEFT interop ----------------------------------------------------------------------
    def checkpoint_key(self, key):
        return key.replace(".bone_", ".miss_")  # PEFT's convert-bone-to-miss.py

    def to_peft_config(self, spec: Bone) -> dict:
        init = {"bat": "bat", "mini": "mini"}.get(spec.mode, spec.init)
        return {"r": spec.r, "miss_dropout": spec.dropout, "mini_r": spec.mini_r, "init_weights": init,
                "bias": "none"}

    def from_peft_config(self, config: dict) -> Bone:
        if config.get("bias", "none") != "none":
            raise AdapterError("MiSS/Bone checkpoint trains biases (bias != 'none'); not supported yet.")
        init = config.get("init_weights", True)
        if init not in (True, False, "bat", "mini"):
            raise AdapterError(
                f"MiSS/Bone checkpoint: init_weights={init!r} is not True, False, 'bat' or 'mini'."
            )
        return Bone(
            r=config.get("r", 64),
            dropout=config.get("miss_dropout", config.get("bone_dropout", 0.0)) or 0.0,
            mode=init if isinstance(init, str) else "balance",
            mini_r=config.get("mini_r", 1) or 1,
            init=bool(init),
        )


register(BoneMethod(), aliases=("BONE",))
