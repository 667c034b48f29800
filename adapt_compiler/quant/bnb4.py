"""bitsandbytes `Linear4bit` (nf4 / fp4, with or without double quantization) as a quantized-layer kind.

The op is bitsandbytes' own training forward, `Linear4bit.forward` -> `MatMul4Bit`:

    y = gemm_4bit(x.to(cd), W4, absmax, bias.to(cd)).to(x.dtype)       cd = the compute dtype
    gemm_4bit = dequantize_4bit(W4, absmax) (out, in) in cd, then F.linear

and its backward re-dequantizes W from the packed weight, as `MatMul4Bit.backward` does:

    dx = (dy.to(cd) @ dequantize_4bit(W4, absmax).to(cd)).to(x.dtype)

so autograd saves only the packed weight and its (tiny) quantization state, never a full-precision W.
Double quantization ("compress_statistics"): absmax is itself 8-bit blockwise-quantized,
absmax = code2[absmax8] · absmax2[i // 256] + offset.

Operands (graph names `<fqn>.weight`, `<fqn>.weight__absmax`, ...): the packed weight, absmax (fp32,
or uint8 with double quant), and with double quant the nested absmax, code and offset.
Constants: block size, quant type, out/in features, compute dtype, the weight's original dtype.

On CPUs with AVX512-BF16, an eager `Linear4bit` forward in eval mode without grad rewrites the weight
in place into a layout for bnb's inference kernel (`packing_format_for_cpu`). We read the operands
once at compile time and keep our own references, so a later repack of the user's model does not
change our graph; a model that is already repacked is refused (the layout is not the one the
training kernels read).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterError
from .kinds import QuantInfo, QuantKind, register

OPERANDS = ("weight", "absmax", "nested_absmax", "nested_code", "nested_offset")


def _is_bnb4(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


def _state(module):
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _describe(module, default_dtype) -> QuantInfo:
    state = _state(module)
    if state is None:
        raise AdapterError(
            f"{type(module).__name__} holds an unquantized weight (no quant_state): bitsandbytes quantizes it when "
            f"the module is moved to a device. Fix: quantize before compiling (e.g. load the model with "
            f"BitsAndBytesConfig(load_in_4bit=True), or call .to('cpu') on the layer)."
        )
    if getattr(state, "packing_format_for_cpu", False):
        raise AdapterError(
            f"{type(module).__name__}: bitsandbytes has rewritten this 4-bit weight into its CPU inference layout "
            f"(an eager forward of the model in eval mode under torch.no_grad does that on AVX512-BF16 CPUs), "
            f"which its training kernels cannot read. Fix: compile before running the model eagerly in eval mode, "
            f"or reload the quantized model."
        )
    if state.nested and state.state2.blocksize != 256:
        raise AdapterError(f"{type(module).__name__}: double quantization with a nested block size of "
                           f"{state.state2.blocksize} is not supported (bitsandbytes uses 256).")
    n, k = (int(d) for d in state.shape)
    scheme = f"bitsandbytes {state.quant_type}" + (" (double quant)" if state.nested else "")
    return QuantInfo(
        kind="bnb_4bit", scheme=scheme, out_features=n, in_features=k, dtype=state.dtype,
        operands=OPERANDS, compute_dtype=module.compute_dtype,
        params=(("blocksize", int(state.blocksize)), ("quant_type", state.quant_type),
                ("compress_statistics", bool(state.nested)),
                ("quant_storage", getattr(module.weight, "quant_storage", torch.uint8))),
    )


def _operands(module) -> dict:
    state = _state(module)
    nested = state.nested
    return {
        "weight": module.weight,
        "absmax": state.absmax,
        "nested_absmax": state.state2.absmax if nested else None,
        "nested_code": state.state2.code if nested else None,
        "nested_offset": state.offset if nested else None,
    }


def _compute_dtype(info: QuantInfo, x_dtype: torch.dtype) -> torch.dtype:
    """Linear4bit casts its input to compute_dtype; unset, the first input's float32/bfloat16 (its
    set_compute_type), else no cast."""
    if info.compute_dtype is not None:
        return info.compute_dtype
    return x_dtype


def _constants(info: QuantInfo, x_dtype: torch.dtype) -> tuple:
    return (info.param("blocksize"), info.param("quant_type"), info.out_features, info.in_features,
            _compute_dtype(info, x_dtype), info.dtype)


def _capture_forward(module, info: QuantInfo, operands: dict):
    tensors = [operands[n] for n in OPERANDS[1:]]

    def forward(x):
        # module.weight: export's fake of the packed parameter, so the graph reads it by FQN
        return bnb4_linear(x, module.bias, module.weight, *tensors, *_constants(info, x.dtype))

    return forward


# -- the op ----------------------------------------------------------------------------------------
def _absmax(absmax, nested_absmax, nested_code, nested_offset) -> Tensor:
    """The fp32 per-block scales (double quant: 8-bit codes over blocks of 256, plus the offset)."""
    if nested_absmax is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(
        absmax, nested_absmax, nested_code, 256, torch.float32) + nested_offset


def dequantize(weight, absmax, nested_absmax, nested_code, nested_offset, blocksize: int, quant_type: str,
               n: int, k: int, dtype: torch.dtype) -> Tensor:
    """W (n, k) in `dtype` (bitsandbytes.functional.dequantize_4bit)."""
    scales = _absmax(absmax, nested_absmax, nested_code, nested_offset)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, scales, blocksize, quant_type, [n, k], dtype)


@torch.library.custom_op("adapt_compiler::bnb4_linear", mutates_args=())
def bnb4_linear(x: Tensor, bias: Optional[Tensor], weight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                nested_code: Optional[Tensor], nested_offset: Optional[Tensor], blocksize: int, quant_type: str,
                out_features: int, in_features: int, compute_dtype: torch.dtype, weight_dtype: torch.dtype) -> Tensor:
    """Linear4bit.forward in training: x.to(cd) -> bitsandbytes::gemm_4bit -> x.dtype (see the module doc)."""
    xc = x.to(compute_dtype)  # x: [..., in_features]
    b = None if bias is None else bias.to(compute_dtype)
    w = weight.view(-1, 1)  # canonical packed layout [(n·k+1)//2, 1]
    shape = [out_features, in_features]
    if nested_absmax is None:
        y = torch.ops.bitsandbytes.gemm_4bit.default(xc, w, shape, absmax, blocksize, quant_type, bias=b)
    else:
        y = torch.ops.bitsandbytes.gemm_4bit.default(xc, w, shape, nested_absmax, blocksize, quant_type, bias=b,
                                                     absmax_8bit=absmax, absmax_code=nested_code,
                                                     absmax_offset=nested_offset)
    return y.to(x.dtype)


@bnb4_linear.register_fake
def _(x, bias, weight, absmax, nested_absmax, nested_code, nested_offset, blocksize, quant_type, out_features,
      in_features, compute_dtype, weight_dtype):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx, inputs, output):
    x, bias, weight, absmax, na, nc, no, blocksize, quant_type, n, k, cd, wd = inputs
    ctx.save_for_backward(weight, absmax, na, nc, no)  # the packed state only
    ctx.constants = (blocksize, quant_type, n, k, cd, wd)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    weight, absmax, na, nc, no = ctx.saved_tensors
    blocksize, quant_type, n, k, cd, wd = ctx.constants
    gx = gb = None
    g = grad.to(cd)
    if ctx.needs_input_grad[0]:
        # MatMul4Bit.backward: dy @ dequantize_4bit(W) (in the weight's dtype, cast to dy's)
        w = dequantize(weight, absmax, na, nc, no, blocksize, quant_type, n, k, wd).to(g.dtype)
        gx = torch.matmul(g, w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        gb = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
    return gx, gb, None, None, None, None, None, None, None, None, None, None, None


bnb4_linear.register_autograd(_backward, setup_context=_setup)


def _dequantize(info: QuantInfo, args: tuple, dtype: torch.dtype) -> Tensor:
    weight, absmax, na, nc, no, blocksize, quant_type, n, k, _cd, _wd = args
    return dequantize(weight, absmax, na, nc, no, blocksize, quant_type, n, k, dtype)


def _quantize(module, info: QuantInfo, w: Tensor) -> nn.Module:
    """A new Linear4bit holding `w` quantized like `module` (a fresh absmax: PEFT's merge over 4-bit)."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(info.in_features, info.out_features, bias=module.bias is not None,
                            compute_dtype=module.compute_dtype, compress_statistics=info.param("compress_statistics"),
                            quant_type=info.param("quant_type"), quant_storage=info.param("quant_storage"),
                            device="meta")
    new.weight = bnb.nn.Params4bit(w.to(info.dtype).to("cpu"), requires_grad=False, blocksize=info.param("blocksize"),
                                   compress_statistics=info.param("compress_statistics"),
                                   quant_type=info.param("quant_type"), quant_storage=info.param("quant_storage"),
                                   module=new).to(w.device)
    new.quant_state = new.weight.quant_state
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    new.compute_type_is_set = module.compute_type_is_set
    new.train(module.training)
    return new


register(QuantKind(
    name="bnb_4bit",
    label="bitsandbytes 4-bit (Linear4bit: nf4/fp4, double quant)",
    detect=_is_bnb4,
    describe=_describe,
    operands=_operands,
    capture_forward=_capture_forward,
    op=torch.ops.adapt_compiler.bnb4_linear.default,
    dequantize=_dequantize,
    quantize=_quantize,
    constants=_constants,
    methods=frozenset({"lora", "adalora", "oft", "boft", "bone"}),
    refused={
        "loha": "PEFT 0.21.2's LoHa reads the packed weight's shape (it crashes on Linear4bit)",
        "lokr": "PEFT 0.21.2's LoKr reads the packed weight's shape (it crashes on Linear4bit)",
        "hra": "PEFT 0.21.2's HRA reads the packed weight (it crashes on Linear4bit)",
    },
))
