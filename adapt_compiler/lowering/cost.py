"""The sympy cost model: FLOPs of each evaluation order of an adapter, over the symbolic token count.

Each method states its extra FLOPs per order (`WeightMethod.cost`) as a sympy expression of the
token count T. The choice for a captured graph compares the orders at the graph's size hint and
records the crossover T* where the orders swap, so `report()` can show why.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

TOKENS = sympy.Symbol("T", positive=True)


@dataclass
class OrderChoice:
    order: str  # "activation" | "weight"
    flops: dict  # order -> sympy expression in T
    at_tokens: int  # the token count the choice was made for
    crossover: float | None  # T where the two orders cost the same (None: one always wins)

    def evaluated(self) -> dict[str, float]:
        return {k: float(sympy.sympify(v).subs(TOKENS, self.at_tokens)) for k, v in self.flops.items()}


# Machine balance: FLOPs one byte of extra memory traffic is worth (CPU/GPU GEMMs are ~5-50 FLOP/B).
FLOPS_PER_BYTE = 4


def base_gemm_flops(layer, tokens):
    """FLOPs of the frozen layer's own GEMM for `tokens` rows (conv: output pixels × patch size)."""
    if layer.kind == "embedding":
        return 0
    k = layer.in_features // layer.groups * layer.kernel_numel
    return 2 * tokens * k * layer.out_features


def weight_elements(layer) -> int:
    n = 1
    for d in layer.weight_shape:
        n *= d
    return n


def with_training_and_traffic(flops: dict, layer, training: bool, additive: bool = True,
                              dtype_bytes: int = 4) -> dict:
    """Complete a method's forward-FLOP figures into per-step costs.

    Weight side: W' is written and read once more per call (traffic), and in training the
    gradient of W' is one more full GEMM (Tᵀ·x, as big as the base GEMM) plus the backward of the
    ΔW build. Activation side of an additive method: the input is read once more and an
    output-sized buffer is written and read back (traffic, ∝ T); its backward is about twice its
    forward. Without that traffic the model called LoRA's orders a tie at T=512, d=512, r=16,
    where the weight order measures 2 % faster in eval (1.033× vs 1.05× the compiled base,
    interleaved). A rotation of the input (OFT, BOFT, HRA) feeds the base GEMM instead of adding
    a second output, and measures faster on the activation side there (OFT 1.06× vs 1.09×).
    """
    out = dict(flops)
    if "weight" in out:
        w = sympy.sympify(out["weight"]) + FLOPS_PER_BYTE * 2 * weight_elements(layer) * dtype_bytes
        if training:
            w = 2 * w + base_gemm_flops(layer, TOKENS)
        out["weight"] = w
    if "activation" in out:
        extra_passes = 0  # elements moved once more than the base layer moves them
        if additive and layer.kind != "embedding":
            extra_passes = TOKENS * (layer.in_features + 2 * layer.out_features)
        a = sympy.sympify(out["activation"]) + FLOPS_PER_BYTE * dtype_bytes * extra_passes
        out["activation"] = 3 * a if training else a
    return out


def choose(flops: dict, tokens: int, forced: str = "auto", allowed=("activation", "weight")) -> OrderChoice:
    """Pick the cheaper order at `tokens` (or the forced one)."""
    options = {k: sympy.sympify(v) for k, v in flops.items() if k in allowed}
    if not options:
        return OrderChoice("activation", {}, tokens, None)
    crossover = None
    if len(options) == 2:
        diff = sympy.simplify(options["activation"] - options["weight"])
        roots = [r for r in sympy.solve(sympy.Eq(diff, 0), TOKENS) if r.is_real and r > 0]
        crossover = float(roots[0]) if roots else None
    if forced != "auto" and forced in options:
        order = forced
    else:
        order = min(options, key=lambda k: float(options[k].subs(TOKENS, tokens)))
    return OrderChoice(order, options, tokens, crossover)
