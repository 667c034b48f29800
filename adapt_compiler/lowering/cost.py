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
