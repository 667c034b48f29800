"""The table of quantized-layer kinds: data, one entry per kind, each defined in its own file.

A kind says how to recognise a quantized linear layer, how to describe it to the methods (its true
(out, in) shape and dtype, never the packed storage's), which tensors its op reads (`operands`),
how to capture it (one `adapt_compiler::<kind>_linear` op, used only while torch.export traces the
model), how to dequantize (a transient full-precision W), how to re-quantize (merged_module with
`requantize=True`), and which adapter methods may sit on it: PEFT 0.21.2's support, so a checkpoint
trained here loads there and back. Everything else refuses by name, before anything is created.

    bnb4.py           bitsandbytes Linear4bit (nf4 / fp4, with or without double quant)
    bnb8.py           bitsandbytes Linear8bitLt (int8, row-wise absmax)
    torchao_int8.py   torchao Int8Tensor, weight-only, per row or per tensor (Int8WeightOnlyConfig)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import AdapterError

OPERAND_SEP = "__"  # `<fqn>.weight__<operand>`: the name a quant operand has in the frozen table and graphs


@dataclass(frozen=True)
class QuantInfo:
    """What the compiler knows about one quantized layer (on `Layer.quant`; hashable, no tensors)."""

    kind: str  # key of KINDS, e.g. "bnb_4bit"
    scheme: str  # human-readable, also written into checkpoints: "bitsandbytes nf4 (double quant)"
    out_features: int
    in_features: int
    dtype: torch.dtype  # the unquantized weight's dtype: adapters take it, dequantize() returns it
    operands: tuple[str, ...]  # the op's tensor operands after (x, bias), in order
    compute_dtype: torch.dtype | None = None  # bitsandbytes 4-bit: the dtype its GEMM runs in (None: the input's)
    params: tuple = ()  # kind-specific constants (block size, quant type, ...), read by the kind's own file

    def param(self, name: str):
        return dict(self.params)[name]


@dataclass(frozen=True)
class QuantKind:
    """One quantized-layer kind (see the module docstring). Functions take the module or the op's
    arguments; none of them changes the user's module."""

    name: str
    label: str  # "bitsandbytes 4-bit (Linear4bit)"
    detect: Callable[[nn.Module], bool]  # is this module of this kind (maybe a variant we refuse)?
    describe: Callable[[nn.Module, torch.dtype], QuantInfo]  # raises AdapterError for refused variants
    operands: Callable[[nn.Module], dict]  # name -> the module's tensor (or None), read once at compile time
    capture_forward: Callable  # (module, info, operands) -> forward(x) calling the op (export only)
    op: object  # the torch.ops overload in the graph: op(x, bias, *operands, *constants)
    dequantize: Callable  # (info, args: operands + constants, dtype) -> W (out, in), transient
    quantize: Callable  # (module, info, W) -> a new module of the same kind holding W quantized
    methods: frozenset  # method names PEFT 0.21.2 supports over this kind (LoRA includes DoRA)
    refused: dict = field(default_factory=dict)  # method name -> why PEFT does not support it
    decompose: Callable | None = None  # pure-ATen inference form of the op (AOTInductor packages)
    constants: Callable = lambda info, x_dtype: ()  # the op's arguments after the operands, for inputs of x_dtype


KINDS: dict[str, QuantKind] = {}

# Quantized layers people load whose kernels we do not know: class name -> what it is. A targeted one
# is refused naming its class (their packages are not even installed here).
FOREIGN = {
    "QuantLinear": "GPTQ (auto-gptq / gptqmodel)",
    "TorchQuantLinear": "GPTQ (gptqmodel)",
    "ExllamaQuantLinear": "GPTQ (exllama)",
    "ExllamaV2QuantLinear": "GPTQ (exllama v2)",
    "MarlinQuantLinear": "GPTQ (marlin)",
    "TritonV2QuantLinear": "GPTQ (triton)",
    "WQLinear_GEMM": "AWQ (autoawq)",
    "WQLinear_GEMV": "AWQ (autoawq)",
    "WQLinear_Exllama": "AWQ (autoawq)",
    "HQQLinear": "HQQ",
    "QuantizedLinear": "AQLM",
    "EetqLinear": "EETQ",
    "FP8Linear": "FP8 (fbgemm / transformers)",
    "HiggsLinear": "HIGGS",
    "BitLinear": "BitNet",
}


def register(kind: QuantKind) -> None:
    KINDS[kind.name] = kind


def supported() -> str:
    """The kinds we support, for error messages."""
    return ", ".join(k.label for k in KINDS.values())


def kind_of(module: nn.Module) -> QuantKind | None:
    """The known kind of a module, or None for an ordinary layer. Raises AdapterError for a quantized
    layer we cannot handle (GPTQ/AWQ/HQQ/..., or a torchao tensor type we do not know)."""
    for kind in KINDS.values():
        if kind.detect(module):
            return kind
    refuse_unknown(module)
    return None


def refuse_unknown(module: nn.Module, fqn: str | None = None) -> None:
    name = type(module).__name__
    where = f"{fqn}: " if fqn else ""
    what = FOREIGN.get(name)
    if what is None and _has_packed_buffers(module):
        what = "a quantized layer (it holds qweight/qzeros/scales)"
    weight = getattr(module, "weight", None)
    if what is None and isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
        what = f"torchao {type(weight).__name__}"
        name = f"{name} with a {type(weight).__name__} weight"
    if what is not None:
        raise AdapterError(
            f"{where}{name} is {what}, a quantized layer kind adapt_compiler does not support. Supported "
            f"quantizations: {supported()}. Fix: load the model with one of those (e.g. transformers "
            f"BitsAndBytesConfig or TorchAoConfig(Int8WeightOnlyConfig())), or exclude the layer from `targets`."
        )


def _has_packed_buffers(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_buffers(recurse=False)} | {n for n, _ in module.named_parameters(recurse=False)}
    return {"qweight", "scales"} <= names


def describe(module: nn.Module, default_dtype: torch.dtype = torch.float32) -> QuantInfo | None:
    """The QuantInfo of a quantized layer, None for an ordinary one (AdapterError for unknown kinds).
    `default_dtype`: the model's float dtype, for kinds that do not record their weight's own."""
    kind = kind_of(module)
    return kind.describe(module, default_dtype) if kind is not None else None


def check_method(info: QuantInfo, fqn: str, method: str, label: str | None = None) -> None:
    """Refuse, by name, a method PEFT does not support over this kind (before anything is created)."""
    kind = KINDS[info.kind]
    if method in kind.methods:
        return
    why = kind.refused.get(method, "PEFT 0.21.2 does not support it")
    names = ", ".join(sorted(_DISPLAY.get(m, m) for m in kind.methods))
    raise AdapterError(
        f"{fqn}: {label or method} over a {info.scheme} layer is not supported: {why}. Over {kind.label} "
        f"these methods are: {names}. Fix: pick one of them, or exclude the quantized layers from `targets`."
    )


_DISPLAY = {"lora": "LoRA (and DoRA)", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT",
            "adalora": "AdaLoRA", "hra": "HRA", "bone": "MiSS/Bone"}


def operand_key(fqn: str, name: str) -> str:
    """Where operand `name` of layer `fqn` lives in the frozen table and in graphs."""
    return f"{fqn}.weight" if name == "weight" else f"{fqn}.weight{OPERAND_SEP}{name}"


def is_operand_key(key: str) -> bool:
    return OPERAND_SEP in key.rsplit(".", 1)[-1] and key.rsplit(".", 1)[-1].startswith("weight" + OPERAND_SEP)


def op_kinds() -> dict:
    """op overload -> its kind, for the matcher."""
    return {k.op: k for k in KINDS.values()}
