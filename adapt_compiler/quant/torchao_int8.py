"""torchao `Int8Tensor` weights (weight-only int8, per row or per tensor) as a quantized-layer kind.

What `Int8WeightOnlyConfig()` (also through transformers' `TorchAoConfig`) puts in an `nn.Linear`.
The op is torchao's own weight-only linear, with a backward that never builds W:

    y  = (x @ Q.to(x.dtype)ᵀ) · s + b          Q: qdata int8 (out, in), s: scale (out,) or (1,)
    dx = (dy · s) @ Q.to(dy.dtype)

torchao's linear runs through `__torch_function__`, so plain autograd keeps `Q.to(dtype)ᵀ`, a
full-precision copy of W, per layer until the backward (PEFT over torchao int8 peaks above a bf16
model); this op saves only Q and s. Operands: `<fqn>.weight__qdata`, `<fqn>.weight__scale`.

Per-group scales, activation quantization (int8 dynamic), zero points, and the int4 tensors (which
have no CPU kernel in torchao 0.18) are refused as kinds we do not know.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import AdapterError
from .kinds import QuantInfo, QuantKind, register

OPERANDS = ("qdata", "scale")


def _is_int8_tensor(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and type(w).__name__ == "Int8Tensor"
            and type(w).__module__.startswith("torchao"))


def _describe(module, default_dtype) -> QuantInfo:
    w = module.weight
    variant = []
    if getattr(w, "act_quant_kwargs", None) is not None:
        variant.append("dynamic int8 activation quantization")
    if getattr(w, "act_pre_scale", None) is not None:
        variant.append("an activation pre-scale")
    zero_point = getattr(w, "zero_point", None)
    if zero_point is not None and bool(zero_point.any()):  # symmetric weights carry an all-zero one
        variant.append("non-zero zero points")
    if w.qdata.dim() != 2 or list(w.block_size)[-1] != w.qdata.shape[-1]:
        variant.append(f"per-group scales (block_size={list(w.block_size)})")
    if variant:
        raise AdapterError(
            f"{type(module).__name__} with a torchao Int8Tensor weight using {', '.join(variant)} is not supported; "
            f"only weight-only int8 with per-row or per-tensor scales (Int8WeightOnlyConfig()) is."
        )
    n, k = (int(d) for d in w.qdata.shape)
    return QuantInfo(kind="torchao_int8", scheme="torchao int8 weight-only", out_features=n, in_features=k,
                     dtype=w.dtype, operands=OPERANDS)


def _operands(module) -> dict:
    return {"qdata": module.weight.qdata, "scale": module.weight.scale}


def _capture_forward(module, info: QuantInfo, operands: dict):
    qdata, scale = operands["qdata"], operands["scale"]

    def forward(x):
        return ao_int8_linear(x, module.bias, qdata, scale)

    return forward


def _forward(x: Tensor, bias: Optional[Tensor], qdata: Tensor, scale: Tensor) -> Tensor:
    # exactly torchao's weight-only Int8Tensor linear (per row / per tensor)
    m = torch.mm(x.reshape(-1, x.shape[-1]), qdata.t().to(x.dtype))  # x: [..., in]; qdata: [out, in]
    y = (m * scale.to(m.dtype).flatten()).reshape(*x.shape[:-1], qdata.shape[0])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@torch.library.custom_op("adapt_compiler::ao_int8_linear", mutates_args=())
def ao_int8_linear(x: Tensor, bias: Optional[Tensor], qdata: Tensor, scale: Tensor) -> Tensor:
    return _forward(x, bias, qdata, scale)


@ao_int8_linear.register_fake
def _(x, bias, qdata, scale):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


def _setup(ctx, inputs, output):
    x, bias, qdata, scale = inputs
    ctx.save_for_backward(qdata, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    qdata, scale = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        g = grad.reshape(-1, grad.shape[-1]) * scale.to(grad.dtype).flatten()  # dy · s, never Q · s
        gx = (g @ qdata.to(grad.dtype)).reshape(*grad.shape[:-1], qdata.shape[1])
    if ctx.has_bias and ctx.needs_input_grad[1]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gb, None, None


ao_int8_linear.register_autograd(_backward, setup_context=_setup)


def _dequantize(info: QuantInfo, args: tuple, dtype: torch.dtype) -> Tensor:
    qdata, scale = args
    # torchao's dequantize_affine: in float32, then the output dtype
    return (qdata.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)).to(dtype)


def _quantize(module, info: QuantInfo, w: Tensor) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    new = nn.Linear(info.in_features, info.out_features, bias=module.bias is not None, device="meta",
                    dtype=info.dtype)
    new.weight = nn.Parameter(w.to(info.dtype), requires_grad=False)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    granularity = "per tensor" if module.weight.scale.numel() == 1 else "per row"
    from torchao.quantization import PerRow, PerTensor

    quantize_(new, Int8WeightOnlyConfig(granularity=PerTensor() if granularity == "per tensor" else PerRow()))
    new.train(module.training)
    return new


register(QuantKind(
    name="torchao_int8",
    label="torchao int8 weight-only (Int8Tensor, per row/tensor)",
    detect=_is_int8_tensor,
    describe=_describe,
    operands=_operands,
    capture_forward=_capture_forward,
    op=torch.ops.adapt_compiler.ao_int8_linear.default,
    dequantize=_dequantize,
    quantize=_quantize,
    methods=frozenset({"lora", "adalora", "loha", "lokr", "oft", "boft", "bone"}),
    refused={"hra": "PEFT 0.21.2's HRA multiplies the Int8Tensor weight directly (torchao has no aten.mm for it)"},
    decompose=_forward,
))
