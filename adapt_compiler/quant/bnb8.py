"""bitsandbytes `Linear8bitLt` (int8 weights, one absmax per row) as a quantized-layer kind.

The op is bitsandbytes' CPU training path (`MatMul8bitFp`), in both modes:

    W = CB.to(x.dtype) · (SCB / 127)[:, None]        y = F.linear(x, W, bias.to(x.dtype))
    dx = dy.to(x.dtype) @ W                           (W re-dequantized in backward)

Autograd saves only CB (int8) and SCB. bitsandbytes' own eval path (LLM.int8: int8 activations,
outlier columns in fp16) computes different numbers from its training path (~0.8 % of the output
on a random Llama); we keep the training numerics in eval too, so eval outputs equal bnb's training
forward, not its LLM.int8 inference (see docs/QUANTIZATION.md).

Operands: `<fqn>.weight` (CB, int8 (out, in)) and `<fqn>.weight__scb` (fp32 (out,)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterError
from .kinds import QuantInfo, QuantKind, register

OPERANDS = ("weight", "scb")


def _is_bnb8(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear8bitLt" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _scb(module):
    scb = getattr(module.state, "SCB", None)
    return scb if scb is not None else getattr(module.weight, "SCB", None)


def _describe(module, default_dtype) -> QuantInfo:
    if module.state.has_fp16_weights or module.weight.dtype != torch.int8 or _scb(module) is None:
        raise AdapterError(
            f"{type(module).__name__} holds unquantized weights (has_fp16_weights=True, or not moved to a device yet); "
            f"only quantized Linear8bitLt layers are supported. Fix: load with BitsAndBytesConfig(load_in_8bit=True)."
        )
    n, k = (int(d) for d in module.weight.shape)
    dtype = module.bias.dtype if module.bias is not None else default_dtype  # int8 weights keep no float dtype
    return QuantInfo(kind="bnb_8bit", scheme="bitsandbytes int8", out_features=n, in_features=k, dtype=dtype,
                     operands=OPERANDS, params=(("threshold", float(module.state.threshold)),))


def _operands(module) -> dict:
    return {"weight": module.weight, "scb": _scb(module)}


def _capture_forward(module, info: QuantInfo, operands: dict):
    scb = operands["scb"]

    def forward(x):
        bias = module.bias
        if bias is not None:  # Linear8bitLt casts its bias to the input dtype
            bias = bias.to(x.dtype)
        return bnb8_linear(x, bias, module.weight, scb)

    return forward


def dequantize(cb: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    # MatMul8bitFp: CB.to(dtype) * (SCB / 127)
    return cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


@torch.library.custom_op("adapt_compiler::bnb8_linear", mutates_args=())
def bnb8_linear(x: Tensor, bias: Optional[Tensor], weight: Tensor, scb: Tensor) -> Tensor:
    return F.linear(x, dequantize(weight, scb, x.dtype), bias)  # x: [..., in]; weight: CB [out, in] int8


@bnb8_linear.register_fake
def _(x, bias, weight, scb):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, bias, weight, scb = inputs
    ctx.save_for_backward(weight, scb)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    weight, scb = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.x_dtype)
        gx = torch.matmul(g, dequantize(weight, scb, ctx.x_dtype)).view(*grad.shape[:-1], weight.shape[1])
    if ctx.has_bias and ctx.needs_input_grad[1]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gb, None, None


bnb8_linear.register_autograd(_backward, setup_context=_setup)


def _decompose(x, bias, weight, scb):
    return F.linear(x, dequantize(weight, scb, x.dtype), bias)


def _dequantize(info: QuantInfo, args: tuple, dtype: torch.dtype) -> Tensor:
    weight, scb = args
    return dequantize(weight, scb, dtype)


def _quantize(module, info: QuantInfo, w: Tensor) -> nn.Module:
    """A new Linear8bitLt holding `w` quantized row-wise (PEFT's merge over 8-bit)."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear8bitLt(info.in_features, info.out_features, bias=module.bias is not None,
                              has_fp16_weights=False, threshold=info.param("threshold"), device="meta")
    new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False).to(w.device)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    new.train(module.training)
    return new


register(QuantKind(
    name="bnb_8bit",
    label="bitsandbytes 8-bit (Linear8bitLt)",
    detect=_is_bnb8,
    describe=_describe,
    operands=_operands,
    capture_forward=_capture_forward,
    op=torch.ops.adapt_compiler.bnb8_linear.default,
    dequantize=_dequantize,
    quantize=_quantize,
    methods=frozenset({"lora", "adalora", "loha", "lokr", "oft", "boft", "bone"}),
    refused={"hra": "PEFT 0.21.2's HRA multiplies the raw int8 codes as if they were weights (its outputs are wrong)"},
    decompose=_decompose,
))
