"""OFT (orthogonal fine-tuning), matching PEFT 0.21.2 `tuners/oft` (its v2 semantics).

    x' = x · BD(R₁..R_r)          y = x' Wᵀ + b            W' = W · BD(R)ᵀ
    Qᵢ = Uᵢ − Uᵢᵀ (Uᵢ strictly upper, filled from row i of oft_R in triu_indices order)
    exact Cayley:   Rᵢ = (I − Qᵢ)(I + Qᵢ)⁻¹
    Cayley–Neumann: Rᵢ = I + 2Σ_{k=1}^{n−2} Qᵢᵏ + Qᵢⁿ⁻¹      (n terms; PEFT's sign: ≈ exactᵀ)

`oft_R` is (r, b(b−1)/2), or (1, …) with block_share. Linear rotates the d_in inputs; Conv2d rotates
the flattened (d_in, kh, kw) patch, the same dims the weight is flattened over, so forward and merge
agree for any kernel (PEFT 0.21.2's k>1 forward folds overlapping patches and is neither identity at
init nor equal to its own merge; we follow the merged form).

Evaluation orders (never a dense d×d matrix):
* activation: x reshaped to (…, r, b) times the r b×b blocks (a batched matmul), 2·T·d·b FLOPs;
  Conv2d with k>1 rotates im2col patches, k=1 rotates the channel dim.
* weight: W' = W·BD(R)ᵀ as the same batched matmul over W's rows, 2·d_out·d·b FLOPs.

The rotation helpers (`rotated_dim`, `evaluate_rotated`, `rows_of`, …) live in `_rotation.py`,
shared with BOFT and HRA, which rotate the same input dims.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..spec import AdapterSpec, check_probability
from ._rotation import (block_rotate, cayley, check_orthogonal_layer, divisors, evaluate_rotated, merged_rows,
                        rotated_dim, show_sizes)
from .method import PREPARED, AdapterError, AdapterShapeError, Layer, WeightMethod
from .registry import register


def multiplicative_dropout(blocks, p: float):
    """PEFT's MultiplicativeDropoutLayer: int(p·k) random blocks of (k, b, b) replaced by I (k > 1)."""
    k, b, _ = blocks.shape
    if k == 1:  # block_share: PEFT skips it
        return blocks
    # PEFT: cat([ones(n), zeros(k - n)])[randperm(k)]; entry j is 1 iff perm[j] < n. Same draw, same
    # mask, without indexing by a random permutation (which Inductor fails to compile: slice_shape)
    mask = (torch.randperm(k, device=blocks.device) < int(p * k)).view(k, 1, 1).to(blocks.dtype)
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


# -- OFT ---------------------------------------------------------------------------------------------
@dataclass
class OFT(AdapterSpec):
    method = "oft"
    r: int = 0  # number of blocks; exactly one of r / oft_block_size is nonzero (PEFT)
    oft_block_size: int = 32
    module_dropout: float = 0.0  # training: int(p·r) random blocks replaced by I (see module doc)
    coft: bool = False  # constrained OFT: project each Q to ‖Q‖_F ≤ eps/√(#blocks) before use
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True  # True: R = I; False: oft_R ~ N(0, 0.1)

    def __post_init__(self):
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise AdapterError(f"OFT: {name}={v!r} must be a non-negative integer.")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise AdapterError(
                f"OFT: set exactly one of r={self.r} / oft_block_size={self.oft_block_size} (the other is 0); "
                f"r × oft_block_size = d_in, e.g. OFT(r=0, oft_block_size=32)."
            )
        check_probability(self, module_dropout=self.module_dropout)
        if self.init_weights not in (True, False):
            raise AdapterError(f"OFT: init_weights={self.init_weights!r} must be True or False.")


def skew(vec, b: int):
    """(k, b(b−1)/2) -> (k, b, b): Q = U − Uᵀ, U strictly upper from vec in triu_indices order."""
    # not cached: Dynamo traces through lru_cache (and warns); in a graph the indices are constants
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    u = vec.new_zeros(vec.shape[0], b, b)
    u[:, rows, cols] = vec
    return u - u.transpose(-2, -1)


def block_size_from(vec_len: int) -> int:
    """b from b(b−1)/2."""
    b = int(round((1 + (1 + 8 * vec_len) ** 0.5) / 2))
    if b * (b - 1) // 2 != vec_len:
        raise AdapterError(f"OFT: oft_R rows of length {vec_len} are not b(b−1)/2 for any block size b.")
    return b


class OFTMethod(WeightMethod):
    name = "oft"
    peft_type = "OFT"
    prefix = "oft_"
    spec_type = OFT
    kinds = frozenset({"linear", "conv2d", "embedding"})  # PEFT: Linear, Conv2d, Embedding
    merge_kind = "multiplicative"

    # -- shapes ----------------------------------------------------------------------------
    def blocks(self, spec: OFT, layer: Layer) -> tuple[int, int]:
        """(number of blocks r, block size b) on this layer."""
        n = rotated_dim(layer)
        if spec.oft_block_size:
            return n // spec.oft_block_size, spec.oft_block_size
        return spec.r, n // spec.r

    def check(self, spec: OFT, layer: Layer) -> None:
        super().check(spec, layer)
        check_orthogonal_layer("OFT", layer)
        n = rotated_dim(layer)
        what = {"linear": "d_in", "embedding": "the embedding dim"}.get(layer.kind, "d_in·kh·kw")
        given, field = (spec.oft_block_size, "oft_block_size") if spec.oft_block_size else (spec.r, "r")
        # PEFT silently moves a non-divisor to the nearest divisor; we refuse, before anything changes
        if n % given or given > n:
            raise AdapterShapeError(
                f"{layer.fqn}: OFT {field}={given} does not divide {what}={n}; "
                f"valid {field} values near it: {show_sizes(divisors(n), given)}."
            )

    def init_params(self, spec: OFT, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r, b = self.blocks(spec, layer)
        rows = 1 if spec.block_share else r
        vec = torch.zeros(rows, b * (b - 1) // 2, dtype=weight.dtype)
        if spec.init_weights is False:
            torch.nn.init.normal_(vec, mean=0.0, std=0.1)
        return {"oft_R": vec}

    # -- the rotation ------------------------------------------------------------------------
    def rotation_blocks(self, spec: OFT, p, training: bool = False) -> torch.Tensor:
        """The (r or 1, b, b) orthogonal blocks Rᵢ. Block size comes from the tensor (trust the checkpoint)."""
        if PREPARED in p:  # built for several layers at once (group_key / prepare_group)
            return p[PREPARED]
        vec = p["oft_R"]
        b = block_size_from(vec.shape[1])
        if spec.coft:
            # PEFT projects the parameter itself, in place, on every use
            with torch.no_grad():
                vec.copy_(self._project(vec, b, spec.eps))
        q = skew(vec, b)  # (k, b, b)
        if spec.use_cayley_neumann:
            r = self._neumann(q, spec.num_cayley_neumann_terms)
        else:
            r = cayley(q)  # R = (I − Q)(I + Q)⁻¹
        if training and spec.module_dropout:
            r = multiplicative_dropout(r, spec.module_dropout)
        return r

    def group_key(self, spec: OFT, layer, p, training):
        # COFT's projection counts a layer's own blocks and module dropout draws per layer: not batched
        if spec.coft or (training and spec.module_dropout):
            return None
        return p["oft_R"].shape[1]  # the block size: rows of all layers concatenate

    def prepare_group(self, spec: OFT, ps, training):
        """Every layer's blocks from one skew + Cayley(-Neumann) over all their oft_R rows."""
        vecs = [p["oft_R"] for p in ps]
        blocks = self.rotation_blocks(spec, {"oft_R": torch.cat(vecs)}, training)
        return list(blocks.split([v.shape[0] for v in vecs]))

    @staticmethod
    def _neumann(q, terms: int):
        """PEFT's series: I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) (n=2: I + 2Q; n=1: I)."""
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        if terms <= 1:
            return eye.clone()
        r = eye + 2.0 * q
        if terms == 2:
            return r
        power = q @ q
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2.0 * power
        return r + power @ q

    @staticmethod
    def _project(vec, b: int, eps: float):
        """COFT: Qᵢ ← Qᵢ·min(1, eps'/‖Qᵢ‖_F), eps' = eps/√(#blocks)."""
        q = skew(vec, b)
        eps = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
        norm = torch.norm(q, dim=(1, 2)).unsqueeze(1)  # (k, 1)
        return torch.where(norm <= eps, vec, vec * (eps / norm))

    # -- evaluation ----------------------------------------------------------------------------
    def forward(self, spec, layer, p, x, weight, bias, training):
        if layer.kind == "embedding":  # PEFT rotates the looked-up rows: E[x]·BD(R)
            out = layer.base(x, weight, None)
            blocks = self.rotation_blocks(spec, p, training).to(out.dtype)
            return block_rotate(out, blocks)
        blocks = self.rotation_blocks(spec, p, training).to(x.dtype)
        return evaluate_rotated(layer, x, weight, bias, lambda h: block_rotate(h, blocks))

    def merged_weight(self, spec, layer, p, weight, bias):
        blocks = self.rotation_blocks(spec, p).to(weight.dtype)
        if layer.kind == "embedding":  # E' = E·BD(R): every row rotated as the forward rotates it
            return block_rotate(weight, blocks), bias
        # W' = W·BD(R)ᵀ: each row of W times the transposed blocks
        return merged_rows(weight, lambda w: block_rotate(w, blocks.transpose(-2, -1))), bias

    def weight_side_ok(self, spec, training):
        return not (training and spec.module_dropout)

    def cost(self, spec, layer, tokens):
        r, b = self.blocks(spec, layer)
        n, d_out = rotated_dim(layer), layer.out_features
        if layer.kind == "embedding":
            d_out = layer.weight_shape[0]  # rows to rotate when merging: the whole table
        k = 1 if spec.block_share else r
        if spec.use_cayley_neumann:
            build = k * max(spec.num_cayley_neumann_terms - 2, 0) * 2 * b**3
        else:
            build = k * 4 * b**3  # LU solve with b right-hand sides
        return {"activation": build + 2 * tokens * n * b, "weight": build + 2 * d_out * n * b}

    # -- PEFT interop ----------------------------------------------------------------------------
    def peft_key(self, param_name, layer):
        if layer.kind == "embedding":
            return {"oft_R": "oft_embedding_R.weight"}.get(param_name, param_name)
        return {"oft_R": "oft_R.weight"}.get(param_name, param_name)

    def to_peft_config(self, spec: OFT) -> dict:
        return {
            "r": spec.r,
            "oft_block_size": spec.oft_block_size,
            "module_dropout": spec.module_dropout,
            "coft": spec.coft,
            "eps": spec.eps,
            "block_share": spec.block_share,
            "use_cayley_neumann": spec.use_cayley_neumann,
            "num_cayley_neumann_terms": spec.num_cayley_neumann_terms,
            "init_weights": spec.init_weights,
            "bias": "none",
            "fan_in_fan_out": False,
            # the Cayley–Neumann parametrisation changed in PEFT 0.18; ours is the current one
            "peft_version": "0.21.2",
        }

    def from_peft_config(self, config: dict) -> OFT:
        if config.get("bias", "none") != "none":
            raise AdapterError("OFT checkpoint trains biases (bias != 'none'); not supported.")
        if "oft_block_size" not in config:
            raise AdapterError(
                "OFT checkpoint from PEFT < 0.14 (no oft_block_size): its parametrisation differs; retrain it."
            )
        return OFT(
            r=config.get("r", 0),
            oft_block_size=config.get("oft_block_size", 32),
            module_dropout=config.get("module_dropout", 0.0),
            coft=config.get("coft", False),
            eps=config.get("eps", 6e-5),
            block_share=config.get("block_share", False),
            use_cayley_neumann=config.get("use_cayley_neumann", True),
            num_cayley_neumann_terms=config.get("num_cayley_neumann_terms", 5),
            init_weights=bool(config.get("init_weights", True)),
        )

    def spec_from_tensors(self, spec: OFT, tensors: dict) -> OFT:
        """PEFT moves a non-dividing r / oft_block_size per layer but saves the configured value:
        when every layer's tensor agrees on one block size (or one block count), use that."""
        shapes = [tuple(t.shape) for k, t in tensors.items() if k.endswith(("oft_R.weight", "oft_embedding_R.weight"))]
        if not shapes:
            return spec
        sizes = {block_size_from(s[1]) for s in shapes}
        counts = {s[0] for s in shapes}
        if spec.oft_block_size and sizes == {spec.oft_block_size}:
            return spec
        if spec.r and (spec.block_share or counts == {spec.r}):
            return spec
        if len(sizes) == 1:
            fixed = spec.replace(r=0, oft_block_size=sizes.pop())
        elif len(counts) == 1 and not spec.block_share:
            fixed = spec.replace(r=counts.pop(), oft_block_size=0)
        else:
            return spec  # the load reports the shape mismatches per layer
        warnings.warn(f"OFT checkpoint: config says r={spec.r}, oft_block_size={spec.oft_block_size} but the "
                      f"tensors say r={fixed.r}, oft_block_size={fixed.oft_block_size}; using the tensors.")
        return fixed


register(OFTMethod())
