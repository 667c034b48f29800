"""The dropouts the LyCORIS methods (LoHa, LoKr) share, as PEFT defines them. A helper file the
registry skips."""

from __future__ import annotations

import torch

from .method import Layer


def dropout_masks(spec, layer: Layer, training: bool, device, rescale: bool = True):
    """(keep, rows) multipliers of the adapter output, or None each; drawn in PEFT's order.

    keep: (1,) 0/1, module dropout. rows: (d_out,) rank-dropout mask, rescaled by 1/mean if `rescale`
    (LoHa always; LoKr only with rank_dropout_scale). Shared by the LyCORIS methods (LoHa, LoKr).
    """
    if not training or not (spec.module_dropout or spec.rank_dropout):
        return None, None
    u = torch.rand(1, device=device)  # PEFT: `torch.rand(1) > module_dropout`, drawn first
    keep = (u > spec.module_dropout).float() if spec.module_dropout else None
    rows = None
    if spec.rank_dropout:
        rows = (torch.rand(layer.out_features, device=device) > spec.rank_dropout).float()  # (d_out,)
        if rescale:
            rows = rows / rows.mean().clamp_min(1e-12)  # PEFT: drop /= drop.mean() (0/0 -> NaN there, 0 here)
    return keep, rows


def apply_masks(delta: torch.Tensor, layer: Layer, keep, rows) -> torch.Tensor:
    """Scale an adapter output (…, d_out) or (N, d_out, H, W) by the dropout masks."""
    if rows is not None:
        delta = delta * layer.channel_view(rows).to(delta.dtype)
    if keep is not None:
        delta = delta * keep.to(delta.dtype)
    return delta
