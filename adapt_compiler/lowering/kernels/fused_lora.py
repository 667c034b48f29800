"""Fused LoRA linear: the base GEMM with the low-rank update added over the same output tile.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ          x [M, K], W [N, K], A [R, K], B [N, R]

Each program owns one (BLOCK_M × BLOCK_N) output tile. While it streams K for the base product it
also accumulates the shrink x·Aᵀ (BLOCK_M × R, R padded to a power of two ≥ 16), then expands it
with Bᵀ and adds s·(x Aᵀ) Bᵀ and the bias before the single store: the low-rank path costs no
extra pass over x and no extra write of y. (The shrink is recomputed per N tile: R/BLOCK_N extra
work, which is what makes the fusion pay for ranks ≪ BLOCK_N.)

Backward (registered on the op) reuses the same kernel for the input gradient,

    dx = g W + s · (g B) A      = fused(g, Wᵀ, -, Bᵀ, Aᵀ, s)    (strided views, no copies)
    dA = s · (g B)ᵀ x           dB = s · gᵀ (x Aᵀ)             (small matmuls, torch)

and the frozen base gets dW / db only if it asks for them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from ._runtime import HAVE_TRITON, INTERPRET, use_kernel

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_lora_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K]
        bias_ptr,  # [N] (unused without HAS_BIAS)
        a_ptr,  # [R, K]
        b_ptr,  # [N, R]
        y_ptr,  # [M, N]
        M, N, K, R,
        scaling,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_ar, stride_ak,
        stride_bn, stride_br,
        stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,  # the interpreter's dot mishandles bf16: upcast there
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        n_ok = rn < N
        r_ok = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x Wᵀ
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # x Aᵀ (shrink)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                         mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # Wᵀ tile [BK, BN]
            at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # Aᵀ tile [BK, BR]
            if DOT_F32:
                x, wt, at = x.to(tl.float32), wt.to(tl.float32), at.to(tl.float32)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
            xa = tl.dot(x, at, xa, input_precision=PRECISION)
        bt = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # Bᵀ tile [BR, BN]
        # expand in the input dtype, like the unfused path: (x Aᵀ) is rounded before ·Bᵀ
        xa = xa.to(bt.dtype)
        if DOT_F32:
            xa, bt = xa.to(tl.float32), bt.to(tl.float32)
        acc += scaling * tl.dot(xa, bt, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_fused_lora(x2, weight, bias, lora_a, lora_b, scaling: float, y) -> None:
    """y[M, N] = x2 Wᵀ + b + s·(x2 Aᵀ) Bᵀ; every operand may be strided (no copies)."""
    M, K = x2.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if x2.is_cuda and not INTERPRET:
        block_m = 64 if M <= 64 else 128
        block_n, block_k = 128, (64 if x2.element_size() == 2 else 32)
        opts = dict(num_warps=4 if block_m == 64 else 8, num_stages=3)
    else:  # the interpreter: few, large programs
        block_m, block_n, block_k = _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 64)
        opts = {}
    block_r = _pow2(R, 16, 1 << 20)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    wrap_triton(_fused_lora_kernel)[grid](
        x2, weight, bias if bias is not None else y, lora_a, lora_b, y,
        M, N, K, R, float(scaling),
        x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        PRECISION=_precision(x2.dtype),
        DOT_F32=INTERPRET and x2.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        **opts,
    )


def _fused_lora_ref(x, weight, bias, lora_a, lora_b, scaling: float):
    """The oracle and CPU path: shrink then expand, never a d_out × d_in matrix."""
    dt = x.dtype
    base = torch.nn.functional.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    return base + scaling * torch.nn.functional.linear(
        torch.nn.functional.linear(x, lora_a.to(dt)), lora_b.to(dt)
    )


@triton_op("adapt_compiler::fused_lora_linear", mutates_args=())
def fused_lora_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor],  # [N] or None
    lora_a: torch.Tensor,  # [R, K]
    lora_b: torch.Tensor,  # [N, R]
    scaling: float,
) -> torch.Tensor:  # [..., N]
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ: the Triton kernel on CUDA, the reference elsewhere."""
    if not use_kernel(x):
        return _fused_lora_ref(x, weight, bias, lora_a, lora_b, scaling)
    dt = x.dtype
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)  # a view where the layout allows; strides go to the kernel
    y = torch.empty((x2.shape[0], N), dtype=dt, device=x.device)
    _launch_fused_lora(x2, weight.to(dt), None if bias is None else bias.to(dt), lora_a.to(dt), lora_b.to(dt),
                       scaling, y)
    return y.reshape(*x.shape[:-1], N)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    s = ctx.scaling
    dt = grad.dtype
    K, N = x.shape[-1], weight.shape[0]
    g = grad.reshape(-1, N)
    x2 = x.reshape(-1, K)
    a, b = lora_a.to(dt), lora_b.to(dt)
    gb = g @ b  # [M, R]  (g B)
    dx = dw = db = da = dlb = None
    if ctx.needs_input_grad[0]:
        # dx = g W + s·(g B) A: the forward kernel with transposed (strided) operands
        dx = fused_lora_linear(grad, weight.t(), None, b.t(), a.t(), s).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dw = (g.t() @ x2).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = g.sum(0)
    if ctx.needs_input_grad[3]:
        da = (s * (gb.t() @ x2)).to(lora_a.dtype)  # [R, K]
    if ctx.needs_input_grad[4]:
        dlb = (s * (g.t() @ (x2 @ a.t()))).to(lora_b.dtype)  # [N, R]
    return dx, dw, db, da, dlb, None


fused_lora_linear.register_autograd(_backward, setup_context=_setup_context)
