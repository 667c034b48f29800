"""Batched multi-adapter LoRA (SGMV-style): every sample picks its adapter by index, one launch.

    y[b] = base[b] + s[i_b] · (x[b] A[i_b]ᵀ) B[i_b]ᵀ      (i_b = -1: base only)
    x [Bsz, S, K] (any layout whose leading dim is the batch), A [L, R, K], B [L, N, R], s [L], i [Bsz]

Ranks are padded to a common R with zeros (exact: zero rows of A / columns of B add nothing).
The launcher sorts the tokens by adapter (stable, on device, no host sync) and cuts each adapter's
run into BLOCK_M tiles; a program owns one (tile, N block): it gathers its rows of x, shrinks with
its adapter's A, expands with B and adds into the rows of the output. Each output element is
written by exactly one program, so no atomics. The grid has cdiv(T, BLOCK_M) + L row tiles, an
upper bound known without reading the indices; unused tiles exit at once.

The CPU path (`_multi_lora_ref`) is a gathered bmm over the batch: A[i], B[i] stacked per sample.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from ._runtime import HAVE_TRITON, INTERPRET, use_kernel
from .fused_lora import _pow2, _precision

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _multi_lora_kernel(
        x_ptr,  # [T, K]
        y_ptr,  # [T, N] (holds base; updated in place)
        a_ptr,  # [L, R, K]
        b_ptr,  # [L, N, R]
        s_ptr,  # [L] scalings
        order_ptr,  # [T] token ids sorted by adapter
        tile_adapter_ptr,  # [tiles] adapter of each row tile
        tile_start_ptr,  # [tiles] first position in `order`
        tile_end_ptr,  # [tiles] one past the last (== start: unused tile)
        N, K, R,
        stride_xt, stride_xk,
        stride_yt, stride_yn,
        stride_al, stride_ar, stride_ak,
        stride_bl, stride_bn, stride_br,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,  # the interpreter's dot mishandles bf16: upcast there
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        if start < end:
            lid = tl.load(tile_adapter_ptr + tile)
            pos = start + tl.arange(0, BLOCK_M)
            m_ok = pos < end
            rows = tl.load(order_ptr + pos, mask=m_ok, other=0)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rr = tl.arange(0, BLOCK_R)
            n_ok = rn < N
            r_ok = rr < R
            a_base = a_ptr + lid * stride_al
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # shrink: x Aᵀ
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + rows[:, None] * stride_xt + rk[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_base + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                             mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # Aᵀ [BK, BR]
                if DOT_F32:
                    x, at = x.to(tl.float32), at.to(tl.float32)
                xa = tl.dot(x, at, xa, input_precision=PRECISION)
            bt = tl.load(b_ptr + lid * stride_bl + rr[:, None] * stride_br + rn[None, :] * stride_bn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # Bᵀ [BR, BN]
            s = tl.load(s_ptr + lid).to(tl.float32)
            xa = xa.to(bt.dtype)
            if DOT_F32:
                xa, bt = xa.to(tl.float32), bt.to(tl.float32)
            delta = s * tl.dot(xa, bt, input_precision=PRECISION)  # expand
            y_at = y_ptr + rows[:, None] * stride_yt + rn[None, :] * stride_yn
            ok = m_ok[:, None] & n_ok[None, :]
            y = tl.load(y_at, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=ok)


def _segments(token_idx: torch.Tensor, num_adapters: int, block_m: int):
    """Sort tokens by adapter and cut each run into row tiles; all on device, no host sync.

    Returns (order [T], tile_adapter, tile_start, tile_end) with cdiv(T, block_m) + L tiles.
    """
    T, L = token_idx.shape[0], num_adapters
    key = torch.where(token_idx < 0, torch.full_like(token_idx, L), token_idx)  # base rows sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=L + 1)[:L]  # tokens per adapter
    starts = torch.cumsum(counts, 0) - counts  # first position of each adapter in `order`
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_begin = tile_end - tiles
    t = torch.arange((T + block_m - 1) // block_m + L, device=token_idx.device)
    seg = torch.searchsorted(tile_end, t, right=True)  # adapter of tile t (L: unused)
    segc = seg.clamp(max=L - 1)
    row_start = starts[segc] + (t - tile_begin[segc]) * block_m
    row_end = torch.minimum(row_start + block_m, starts[segc] + counts[segc])
    row_end = torch.where(seg < L, row_end, row_start)
    return order, segc, row_start, row_end


def _launch_multi_lora(x2, y, lora_a, lora_b, scalings, token_idx) -> None:
    T, K = x2.shape
    N = y.shape[1]
    L, R = lora_a.shape[0], lora_a.shape[1]
    if x2.is_cuda and not INTERPRET:
        block_m, block_n, block_k = 32, 128, (64 if x2.element_size() == 2 else 32)
        opts = dict(num_warps=4, num_stages=3)
    else:
        block_m, block_n, block_k = _pow2(T, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 64)
        opts = {}
    block_r = _pow2(R, 16, 1 << 20)
    order, tile_adapter, tile_start, tile_end = _segments(token_idx, L, block_m)
    grid = (tile_start.shape[0], triton.cdiv(N, block_n))
    wrap_triton(_multi_lora_kernel)[grid](
        x2, y, lora_a, lora_b, scalings, order, tile_adapter, tile_start, tile_end,
        N, K, R,
        x2.stride(0), x2.stride(1),
        y.stride(0), y.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        PRECISION=_precision(x2.dtype),
        DOT_F32=INTERPRET and x2.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        **opts,
    )


def _gathered(lora_a, lora_b, scalings, indices, dt):
    i = indices.clamp(min=0)
    s = torch.where(indices >= 0, scalings[i].to(dt), torch.zeros((), dtype=dt, device=scalings.device))
    return lora_a[i].to(dt), lora_b[i].to(dt), s  # [Bsz, R, K], [Bsz, N, R], [Bsz]


def _multi_lora_ref(x, base, lora_a, lora_b, scalings, indices):
    """Gathered bmm over the batch: each sample's A, B stacked, base rows get s = 0."""
    bsz, K, N = indices.shape[0], x.shape[-1], base.shape[-1]
    a, b, s = _gathered(lora_a, lora_b, scalings, indices, x.dtype)
    x3 = x.reshape(bsz, -1, K)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2)) * s[:, None, None]
    return base + delta.reshape(base.shape)


@triton_op("adapt_compiler::multi_lora", mutates_args=())
def add_multi_lora(
    x: torch.Tensor,  # [Bsz, ..., K], batch-major
    base: torch.Tensor,  # [Bsz, ..., N]: the base layer's output
    lora_a: torch.Tensor,  # [L, R, K]
    lora_b: torch.Tensor,  # [L, N, R]
    scalings: torch.Tensor,  # [L]
    indices: torch.Tensor,  # [Bsz] int64, -1 = no adapter
) -> torch.Tensor:
    """base + s[i]·(x Aᵢᵀ) Bᵢᵀ per sample: the SGMV kernel on CUDA, a gathered bmm elsewhere."""
    if not use_kernel(x):
        return _multi_lora_ref(x, base, lora_a, lora_b, scalings, indices)
    dt = x.dtype
    bsz, K, N = indices.shape[0], x.shape[-1], base.shape[-1]
    x2 = x.reshape(-1, K)
    per_sample = x2.shape[0] // bsz
    token_idx = indices.to(torch.int64)[:, None].expand(bsz, per_sample).reshape(-1)
    y = base.reshape(-1, N).to(dt).clone(memory_format=torch.contiguous_format)
    _launch_multi_lora(x2, y, lora_a.to(dt), lora_b.to(dt), scalings.float(), token_idx)
    return y.reshape(base.shape)


def _setup_context(ctx, inputs, output):
    x, base, lora_a, lora_b, scalings, indices = inputs
    ctx.save_for_backward(x, lora_a, lora_b, scalings, indices)


def _backward(ctx, grad):
    x, lora_a, lora_b, scalings, indices = ctx.saved_tensors
    bsz, K, N = indices.shape[0], x.shape[-1], grad.shape[-1]
    a, b, s = _gathered(lora_a, lora_b, scalings, indices, grad.dtype)
    g3, x3 = grad.reshape(bsz, -1, N), x.reshape(bsz, -1, K)
    gb = torch.bmm(g3, b) * s[:, None, None]  # s·(g B)  [Bsz, S, R]
    dx = da = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.bmm(gb, a).reshape(x.shape)
    i = indices.clamp(min=0)
    if ctx.needs_input_grad[2]:
        da = torch.zeros_like(lora_a).index_add_(0, i, torch.bmm(gb.transpose(1, 2), x3).to(lora_a.dtype))
    if ctx.needs_input_grad[3]:
        h = torch.bmm(x3, a.transpose(1, 2))  # x Aᵀ  [Bsz, S, R]
        gh = torch.bmm(g3.transpose(1, 2), h) * s[:, None, None]
        db = torch.zeros_like(lora_b).index_add_(0, i, gh.to(lora_b.dtype))
    return dx, grad if ctx.needs_input_grad[1] else None, da, db, None, None


add_multi_lora.register_autograd(_backward, setup_context=_setup_context)
