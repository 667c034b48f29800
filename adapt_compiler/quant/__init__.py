"""Quantized base models: the kinds of quantized linear layers adapters can sit on.

    kinds.py         the table (QuantInfo, QuantKind), detection, refusals, which methods each allows
    bnb4.py, bnb8.py, torchao_int8.py    one file per kind: its op, describe, dequantize, quantize
    leaves.py        capture: one op per quantized layer while torch.export runs, stable operand names
    weight.py        QuantizedWeight, the handle methods get instead of a weight tensor

Layering: this package sits just above the leaf modules (it imports only `errors`), because the
capture (leaves.py), the matcher and method contract (passes), the slots and merge (lowering) and
the AdaptedModule all read the same table. bitsandbytes and torchao are optional (the `quant`
extra): nothing here imports them until a layer of theirs is met.
"""

from __future__ import annotations

from . import bnb4, bnb8, torchao_int8  # noqa: F401  (each registers its kind)
from .kinds import (KINDS, OPERAND_SEP, QuantInfo, QuantKind, check_method, describe, is_operand_key, kind_of,
                    op_kinds, operand_key, refuse_unknown, supported)
from .leaves import known_layers, name_operands, quantized_leaves
from .weight import QuantizedWeight, as_dense

__all__ = [
    "KINDS", "OPERAND_SEP", "QuantInfo", "QuantKind", "QuantizedWeight", "as_dense", "check_method", "describe",
    "is_operand_key", "kind_of", "known_layers", "name_operands", "op_kinds", "operand_key", "quantized_leaves",
    "refuse_unknown", "supported",
]
