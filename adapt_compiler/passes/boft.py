"""BOFT (butterfly orthogonal fine-tuning), matching PEFT 0.21.2 `tuners/boft`.

    Sᵢⱼ = ½(Rᵢⱼ − Rᵢⱼᵀ)      Qᵢⱼ = (I − Sᵢⱼ)(I + Sᵢⱼ)⁻¹       (boft_R: (N, D, b, b))
    Bᵢ = Pᵢ · BD(Qᵢ₁..Q_iD) · Pᵢᵀ        M = B_{N−1} ⋯ B₁ B₀
    y = ((x·M) Wᵀ) ⊙ s + b               W' = (W·Mᵀ) ⊙ s          (boft_s: one scale per output)

Pᵢ is PEFT's `block_butterfly_perm(n, D/2ⁱ, b/2)`: inside each chunk of b·2ⁱ inputs the width-b/2
sub-blocks are reordered evens first, then odds (P₀ = I). As a view: x·Pᵢᵀ = x[…, perm] is
x.view(…, chunks, m/2, 2, b/2).transpose(-3, -2), and x·Pᵢ its inverse, so the permutations cost no
FLOPs and no dense matrix; each factor is one batched (D, b, b) matmul. Factor i mixes only inside
chunks of b·2ⁱ, so M is block diagonal with blocks of B = b·2^(N−1): when that is not much wider than
N factors' work (`dense_blocks_pay`), the blocks are built once per call from B rows and x·M is ONE
batched matmul over x (one pass instead of N permute/matmul/permute passes).

Shapes come from the tensors: PEFT on CPU silently trains with ONE butterfly factor while its config
keeps the requested N, so a checkpoint's boft_R shape wins over its config (`spec_from_tensors`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..spec import AdapterSpec, check_probability
from .method import PREPARED, AdapterError, AdapterShapeError, Layer, WeightMethod
from ._rotation import block_rotate, cayley, check_orthogonal_layer, divisors, evaluate_rotated, merged_rows, rotated_dim, show_sizes
from .registry import register


@dataclass
class BOFT(AdapterSpec):
    method = "boft"
    boft_block_size: int = 4  # exactly one of boft_block_size / boft_block_num is nonzero (PEFT)
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1  # N; 1 = block-diagonal OFT + output scale
    boft_dropout: float = 0.0  # training: int(p·D) blocks of one random factor replaced by I
    init_weights: bool = True  # True: R = 0 (M = I), s = 1; False: R ~ N(0, 0.1), s ~ N(1, 0.1)

    def __post_init__(self):
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise AdapterError(f"BOFT: {name}={v!r} must be a non-negative integer.")
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise AdapterError(
                f"BOFT: set exactly one of boft_block_size={self.boft_block_size} / boft_block_num="
                f"{self.boft_block_num} (the other is 0); block size × block count = d_in."
            )
        n = self.boft_n_butterfly_factor
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise AdapterError(f"BOFT: boft_n_butterfly_factor={n!r} must be a positive integer.")
        check_probability(self, boft_dropout=self.boft_dropout)
        if self.init_weights not in (True, False):
            raise AdapterError(f"BOFT: init_weights={self.init_weights!r} must be True or False.")


# -- the butterfly permutations as views -------------------------------------------------------------
def _shuffle(h, i: int, b: int):
    """h·Pᵢᵀ = h[…, perm_i]: per chunk of b·2ⁱ, sub-blocks of b/2 go evens first, then odds."""
    if i == 0:
        return h  # chunks of b hold 2 sub-blocks: [0, 1] is already "evens, odds"
    n, half = h.shape[-1], b // 2
    m = (b << i) // half  # sub-blocks per chunk (2^(i+1))
    v = h.reshape(*h.shape[:-1], n // (b << i), m // 2, 2, half)
    return v.transpose(-3, -2).reshape(h.shape)


def _unshuffle(h, i: int, b: int):
    """h·Pᵢ = h[…, perm_i⁻¹], the inverse view of `_shuffle`."""
    if i == 0:
        return h
    n, half = h.shape[-1], b // 2
    m = (b << i) // half
    v = h.reshape(*h.shape[:-1], n // (b << i), 2, m // 2, half)
    return v.transpose(-3, -2).reshape(h.shape)


def butterfly(h, q, transpose: bool = False):
    """Row vectors h (…, n) times M (or Mᵀ), q the (N, D, b, b) orthogonal blocks.

    h·M = h·B_{N−1}⋯B₀ applies B_{N−1} first; h·Mᵀ = h·B₀ᵀ⋯B_{N−1}ᵀ applies B₀ᵀ first, with
    h·Bᵢ = (h·Pᵢ)·BD(Qᵢ)·Pᵢᵀ.
    """
    n_factors, b = q.shape[0], q.shape[-1]
    order = range(n_factors) if transpose else reversed(range(n_factors))
    for i in order:
        blocks = q[i].transpose(-2, -1) if transpose else q[i]
        h = _shuffle(block_rotate(_unshuffle(h, i, b), blocks), i, b)
    return h


def butterfly_blocks(q, n: int) -> torch.Tensor:
    """M = B_{N−1}⋯B₀ as its diagonal blocks, (n/B, B, B) with B = b·2^(N−1).

    Factor i only mixes indices inside chunks of b·2ⁱ, so M is block diagonal with blocks of B.
    Row j of every block at once: push E (B, n), E[j, k·B + j] = 1, through the butterfly.
    """
    n_factors, b = q.shape[0], q.shape[-1]
    big = b << (n_factors - 1)
    e = torch.eye(big, device=q.device, dtype=q.dtype).repeat(1, n // big)  # (B, n)
    rows = butterfly(e, q)  # row j holds row j of each block
    return rows.reshape(big, n // big, big).transpose(0, 1)


def dense_blocks_pay(n_factors: int, b: int) -> bool:
    """One block-diagonal matmul (B = b·2^(N−1) wide) instead of N permute + matmul passes: the
    FLOPs grow from b·N to B per element, the passes over h drop from ~3N to 1. One factor is
    already a single block-diagonal matmul."""
    return n_factors > 1 and (b << (n_factors - 1)) <= 2 * b * n_factors


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """PEFT's `block_butterfly_perm` as an index (used by tests to check the views)."""
    if factors == 0:
        return torch.arange(n)
    return _shuffle(torch.arange(n), int(math.log2(n // blocks // (2 * half))), 2 * half)


class BOFTMethod(WeightMethod):
    name = "boft"
    peft_type = "BOFT"
    prefix = "boft_"
    spec_type = BOFT
    kinds = frozenset({"linear", "conv2d"})
    merge_kind = "multiplicative"

    # -- shapes ----------------------------------------------------------------------------
    def blocks(self, spec: BOFT, layer: Layer) -> tuple[int, int, int]:
        """(N factors, D blocks per factor, block size b) on this layer."""
        n = rotated_dim(layer)
        if spec.boft_block_size:
            return spec.boft_n_butterfly_factor, n // spec.boft_block_size, spec.boft_block_size
        return spec.boft_n_butterfly_factor, spec.boft_block_num, n // spec.boft_block_num

    def check(self, spec: BOFT, layer: Layer) -> None:
        super().check(spec, layer)
        check_orthogonal_layer("BOFT", layer)
        n = rotated_dim(layer)
        what = "d_in" if layer.kind == "linear" else "d_in·kh·kw"
        nf = spec.boft_n_butterfly_factor
        span = 2 ** (nf - 1)  # the last butterfly factor mixes b·2^(N−1) inputs
        if spec.boft_block_size:
            b, field = spec.boft_block_size, "boft_block_size"
            ok = [s for s in divisors(n) if n % (s * span) == 0 and (nf == 1 or (s % 2 == 0 and (n // s) % 2 == 0))]
            bad = n % (b * span) != 0 or (nf > 1 and (b % 2 or (n // b) % 2))
            given = b
        else:
            d, field = spec.boft_block_num, "boft_block_num"
            ok = [k for k in divisors(n) if k % span == 0 and (nf == 1 or (k % 2 == 0 and (n // k) % 2 == 0))]
            bad = n % d != 0 or d % span != 0 or (nf > 1 and (d % 2 or (n // d) % 2))
            given = d
        if bad:
            extra = f" with boft_n_butterfly_factor={nf} (block size and count even, d divisible by size·2^(N−1))" \
                if nf > 1 else ""
            sizes = show_sizes(ok, given) if ok else "none (lower boft_n_butterfly_factor)"
            raise AdapterShapeError(
                f"{layer.fqn}: BOFT {field}={given} does not fit {what}={n}{extra}; valid {field} values: {sizes}."
            )

    def init_params(self, spec: BOFT, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        nf, d, b = self.blocks(spec, layer)
        r = torch.zeros(nf, d, b, b, dtype=weight.dtype)
        # PEFT's shapes: (d_out, 1) for Linear, (1, d_out) for Conv2d
        s_shape = (1, layer.out_features) if layer.kind == "conv2d" else (layer.out_features, 1)
        s = torch.ones(s_shape, dtype=weight.dtype)
        if spec.init_weights is False:
            torch.nn.init.normal_(r, mean=0.0, std=0.1)
            torch.nn.init.normal_(s, mean=1.0, std=0.1)
        return {"boft_R": r, "boft_s": s}

    # -- the rotation ------------------------------------------------------------------------
    def rotation_blocks(self, spec: BOFT, p, training: bool = False) -> torch.Tensor:
        """The (N, D, b, b) Cayley blocks, with PEFT's block dropout in training."""
        r = p["boft_R"]
        nf, d, b, _ = r.shape
        s = 0.5 * (r - r.transpose(-2, -1)).reshape(nf * d, b, b)  # skew part only
        q = cayley(s).reshape(nf, d, b, b)  # (I − S)(I + S)⁻¹
        if training and spec.boft_dropout:
            q = self._dropout(q, spec.boft_dropout)
        return q

    @staticmethod
    def _dropout(q, p: float):
        """PEFT's MultiplicativeDropoutLayer, same RNG calls in the same order (randint, then randperm)."""
        nf, d, b, _ = q.shape
        which = torch.randint(0, nf, (1,))
        # PEFT: cat([ones(k), zeros(d - k)])[randperm(d)], i.e. 1 where perm < k: the same draw and mask,
        # without indexing by a random permutation (which Inductor fails to compile)
        mask = (torch.randperm(d, device=q.device) < int(p * d)).view(1, d, 1, 1).float()
        factor = (torch.arange(nf).view(nf, 1, 1, 1) == which).to(mask)  # one-hot, no .item() in the graph
        full = (factor * mask).to(q.dtype)
        eye = torch.eye(b, device=q.device, dtype=q.dtype)
        return (1 - full) * q + full * eye

    # -- evaluation ----------------------------------------------------------------------------
    def _rotation_operand(self, spec: BOFT, p, training: bool) -> torch.Tensor:
        """What the activation side multiplies by: M's dense diagonal blocks (`dense_blocks_pay`) or
        the (N, D, b, b) factors. Layers concatenated along D give their operands concatenated too:
        no butterfly chunk crosses a layer (each layer's width is a multiple of b·2^(N−1))."""
        q = self.rotation_blocks(spec, p, training)
        nf, d, b, _ = q.shape
        return butterfly_blocks(q, d * b) if dense_blocks_pay(nf, b) else q

    def group_key(self, spec: BOFT, layer, p, training):
        if training and spec.boft_dropout:  # PEFT draws the dropped factor per layer: not batched
            return None
        r = p["boft_R"]
        return r.shape[0], r.shape[-1]  # factors and block size: layers concatenate along D

    def prepare_group(self, spec: BOFT, ps, training):
        """All layers' Cayley solves as one batched solve, and their butterfly blocks in one pass."""
        rs = [p["boft_R"] for p in ps]
        operand = self._rotation_operand(spec, {"boft_R": torch.cat(rs, dim=1)}, training)
        nf, b = rs[0].shape[0], rs[0].shape[-1]
        if dense_blocks_pay(nf, b):  # (Σ n/B, B, B): layer i owns D_i·b/B blocks
            return list(operand.split([r.shape[1] * b // (b << (nf - 1)) for r in rs]))
        return list(operand.split([r.shape[1] for r in rs], dim=1))

    def forward(self, spec, layer, p, x, weight, bias, training):
        operand = p[PREPARED] if PREPARED in p else self._rotation_operand(spec, p, training)
        operand = operand.to(x.dtype)
        scale = p["boft_s"].reshape(-1).to(x.dtype)
        if operand.dim() == 3:  # M's dense diagonal blocks: one block-diagonal matmul
            return evaluate_rotated(layer, x, weight, bias, lambda h: block_rotate(h, operand), scale=scale)
        return evaluate_rotated(layer, x, weight, bias, lambda h: butterfly(h, operand), scale=scale)

    def merged_weight(self, spec, layer, p, weight, bias):
        q = self.rotation_blocks(spec, p).to(weight.dtype)
        scale = p["boft_s"].reshape(-1).to(weight.dtype)
        # W' = (W·Mᵀ) ⊙ s, row by row
        return merged_rows(weight, lambda w: butterfly(w, q, transpose=True), scale=scale), bias

    def weight_side_ok(self, spec, training):
        return not (training and spec.boft_dropout)

    def cost(self, spec, layer, tokens):
        nf, d, b = self.blocks(spec, layer)
        n, d_out = rotated_dim(layer), layer.out_features
        build = nf * d * 4 * b**3  # N·D b×b solves
        per_row = nf * 2 * n * b  # N block-diagonal factors
        if dense_blocks_pay(nf, b):
            big = b << (nf - 1)
            build += big * per_row  # the butterfly on B rows gives M's diagonal blocks
            per_row = 2 * n * big
        return {
            "activation": build + per_row * tokens + tokens * d_out,
            "weight": build + nf * 2 * d_out * n * b + d_out * n,
        }

    # -- PEFT interop ----------------------------------------------------------------------------
    def to_peft_config(self, spec: BOFT) -> dict:
        return {
            "boft_block_size": spec.boft_block_size,
            "boft_block_num": spec.boft_block_num,
            "boft_n_butterfly_factor": spec.boft_n_butterfly_factor,
            "boft_dropout": spec.boft_dropout,
            "init_weights": spec.init_weights,
            "bias": "none",
            "fan_in_fan_out": False,
        }

    def from_peft_config(self, config: dict) -> BOFT:
        if config.get("bias", "none") != "none":
            raise AdapterError("BOFT checkpoint trains biases (bias != 'none'); not supported.")
        return BOFT(
            boft_block_size=config.get("boft_block_size", 4),
            boft_block_num=config.get("boft_block_num", 0),
            boft_n_butterfly_factor=config.get("boft_n_butterfly_factor", 1),
            boft_dropout=config.get("boft_dropout", 0.0),
            init_weights=bool(config.get("init_weights", True)),
        )

    def spec_from_tensors(self, spec: BOFT, tensors: dict) -> BOFT:
        """Trust boft_R's shape (N, D, b, b) over the config (PEFT on CPU saves N=1 tensors under N>1)."""
        factors = {t.shape[0] for k, t in tensors.items() if k.endswith("boft_R")}
        if len(factors) != 1 or factors == {spec.boft_n_butterfly_factor}:
            return spec
        n = factors.pop()
        warnings.warn(f"BOFT checkpoint: config says boft_n_butterfly_factor={spec.boft_n_butterfly_factor} but "
                      f"its tensors hold {n} factor(s) (PEFT without its CUDA extension); using {n}.")
        return spec.replace(boft_n_butterfly_factor=n)


register(BOFTMethod())
