"""Shared math of the orthogonal methods (OFT, BOFT, HRA), which rotate the same input dims.

A helper file, not a method: the registry skips `_`-prefixed files. Linear rotates the d_in inputs;
Conv2d rotates the flattened (d_in, kh, kw) patch, the dims the weight is flattened over, so the
activation side (`evaluate_rotated`) and the weight side (`merged_rows`) agree for any kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AdapterShapeError
from .method import Layer


def rotated_dim(layer: Layer) -> int:
    """The length of the vector the rotation acts on: d_in, d_in·kh·kw for Conv2d, and for an
    Embedding (OFT rotates its output rows) the embedding dim."""
    if layer.kind == "conv2d":
        kh, kw = layer.kernel_size
        return layer.in_features * kh * kw
    if layer.kind == "embedding":
        return layer.weight_shape[1]
    return layer.in_features


def check_orthogonal_layer(method: str, layer: Layer) -> None:
    if layer.kind == "conv2d" and layer.groups > 1:
        raise AdapterShapeError(
            f"{layer.fqn}: {method} cannot adapt a Conv2d with groups={layer.groups} (its weight holds only "
            f"d_in/groups input channels per output); exclude it from `targets`."
        )


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def show_sizes(sizes: list[int], near: int, limit: int = 12) -> str:
    """The valid sizes closest to `near`, ascending (the full list can be long)."""
    close = sorted(sorted(sizes, key=lambda s: abs(s - near))[:limit])
    return ", ".join(map(str, close))


# Largest block size solved by the unrolled elimination in `cayley` (its graph grows with b).
GAUSS_JORDAN_MAX = 32


def cayley(s: torch.Tensor) -> torch.Tensor:
    """(I − S)(I + S)⁻¹ for a batch of skew-symmetric S (…, b, b), as PEFT's linalg.solve gives it.

    I ± S has symmetric part I, so elimination needs no pivoting (every pivot is positive). For
    small b an unrolled Gauss–Jordan in plain tensor ops, which Inductor fuses into a few kernels,
    runs several times faster than LAPACK's batched solve (one call per b×b matrix, forward and
    backward): BOFT solves thousands of 8×8 systems per step. Half precision is solved in float32.
    """
    b, dtype = s.shape[-1], s.dtype
    wide = s.float() if dtype in (torch.float16, torch.bfloat16) else s
    eye = torch.eye(b, device=s.device, dtype=wide.dtype)
    if b > GAUSS_JORDAN_MAX:
        return torch.linalg.solve(eye + wide, eye - wide, left=False).to(dtype)
    # X (I + S) = I − S  ⇔  (I − S) Xᵀ = I + S  (Sᵀ = −S): reduce [I − S | I + S] to [I | Xᵀ]
    aug = torch.cat([(eye - wide).expand_as(wide), eye + wide], dim=-1)
    for k in range(b):
        row = aug[..., k : k + 1, :] / aug[..., k : k + 1, k : k + 1]
        aug = aug - aug[..., :, k : k + 1] * row
        aug = torch.cat([aug[..., :k, :], row, aug[..., k + 1 :, :]], dim=-2)
    return aug[..., b:].transpose(-2, -1).to(dtype)


def rows_of(weight: torch.Tensor) -> torch.Tensor:
    """Canonical weight as rows over the rotated dim: (d_out, d_in[·kh·kw])."""
    return weight.reshape(weight.shape[0], -1)


def evaluate_rotated(layer: Layer, x, weight, bias, rotate, scale=None):
    """The base layer on rotated inputs: y = (rotate(x)·Wᵀ) ⊙ scale + b.

    `rotate` maps row vectors over the rotated dim (…, n) -> (…, n). `scale` is an optional per-output
    vector (BOFT's s), applied before the bias as PEFT does.
    """
    if layer.kind == "linear":  # layer.base: the quantized op too, when the base is quantized
        y = layer.base(rotate(x), weight, None if scale is not None else bias)
    elif layer.pointwise:
        # 1×1 conv: the patch is the channel vector; rotating before zero padding is the same
        xr = rotate(x.movedim(1, -1)).movedim(-1, 1)
        y = layer.conv(xr, weight, None if scale is not None else bias)
    else:
        y = _conv_on_rotated_patches(layer, x, weight, rotate)
        if scale is None and bias is not None:
            y = y + bias.view(1, -1, 1, 1)
    if scale is None:
        return y
    shape = (1, -1, 1, 1) if layer.kind == "conv2d" else (-1,)
    y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _conv_on_rotated_patches(layer: Layer, x, weight, rotate):
    """conv2d(x, W') with W'_flat = W_flat·Mᵀ, as im2col: rotate each (c, i, j) patch, then one GEMM."""
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    padding = layer.padding
    if isinstance(padding, str):
        if padding == "same":  # torch pads total//2 on the left/top, the rest on the right/bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        padding = (0, 0)
    ph, pw = padding
    batch, _, h, w = x.shape
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (B, C·kh·kw, L)
    cols = rotate(cols.transpose(1, 2))  # (B, L, C·kh·kw): unfold's order (c, i, j) = W's flattening
    y = cols @ rows_of(weight).T  # (B, L, d_out)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return y.transpose(1, 2).reshape(batch, weight.shape[0], ho, wo)


def merged_rows(weight, rotate_rows, scale=None):
    """W' in canonical layout from a row transform of W_flat (d_out, n) -> (d_out, n)."""
    w = rotate_rows(rows_of(weight))
    if scale is not None:
        w = w * scale.reshape(-1, 1)
    return w.reshape(weight.shape)


def block_rotate(h, blocks):
    """h · BD(blocks) for row vectors h (…, n), blocks (k, b, b) (k == 1: shared by all n/b blocks)."""
    k, b, _ = blocks.shape
    hb = h.reshape(*h.shape[:-1], h.shape[-1] // b, b)  # (…, n/b, b)
    if k == 1:
        out = hb @ blocks[0]
    else:
        out = torch.einsum("...rk,rkc->...rc", hb, blocks)  # one batched matmul over the r blocks
    return out.reshape(h.shape)
