"""`QuantizedWeight`: the frozen weight of a quantized layer, as adapter methods see it.

An AdapterSlot over a quantized layer receives the layer op's operands (packed weight, scales,
constants) instead of a weight tensor, and hands methods this handle where they expect W:

* `shape` is the true (out, in), `dtype` the dtype the layer computes in (its input's), `device`;
* `Layer.base(x, w, b)` calls `w.linear(x, b)`: the quantized op, whose backward re-dequantizes;
* `w + t` (a method rebuilding W + ΔW: DoRA's weight norm, the weight-side order, merge) and
  `dequantize()` give a full-precision W that lives only as long as the expression using it.

It is deliberately not a tensor: anything else a method might do with W fails loudly instead of
silently reading packed 4-bit codes (what PEFT's HRA does over bitsandbytes 8-bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kinds import KINDS, QuantInfo


class QuantizedWeight:
    def __init__(self, info: QuantInfo, args: tuple, dtype: torch.dtype):
        self.info = info
        self.args = tuple(args)  # the op's operands and constants, after (x, bias)
        self.dtype = dtype
        self.shape = torch.Size((info.out_features, info.in_features))
        self.device = next(a for a in self.args if isinstance(a, torch.Tensor)).device

    @property
    def ndim(self) -> int:
        return 2

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, dense: torch.Tensor | None = None):
        """The layer's own op on x; with `dense` (a full-precision W', e.g. W + ΔW in eval), the same
        casts around a plain GEMM with W' instead."""
        kind = KINDS[self.info.kind]
        if dense is None:
            return kind.op(x, bias, *self.args)
        cd = self.info.compute_dtype or x.dtype
        b = None if bias is None else bias.to(cd)
        return F.linear(x.to(cd), dense.to(cd), b).to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: this weight's dtype); transient, never stored."""
        return KINDS[self.info.kind].dequantize(self.info, self.args, dtype or self.dtype)

    def __add__(self, other):
        return self.dequantize() + other

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.info.scheme}, shape={tuple(self.shape)}, dtype={self.dtype})"


def as_dense(weight) -> torch.Tensor:
    """A tensor weight as is; a QuantizedWeight dequantized (transient)."""
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def frozen_weight(info: QuantInfo, operands: dict, dtype: torch.dtype) -> QuantizedWeight:
    """The QuantizedWeight of a layer from its operands (name -> tensor or None), outside any graph
    (adapter init, merge), computing in `dtype`."""
    kind = KINDS[info.kind]
    args = (*(operands[name] for name in info.operands), *kind.constants(info, dtype))
    return QuantizedWeight(info, args, dtype)
