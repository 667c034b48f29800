"""PEFT's LoRA variants that change the low-rank product itself, as LoRA options (PEFT keeps them
in LoraConfig, under the same peft_type). A helper file the method registry skips; passes/lora.py
calls it. PEFT allows one variant per layer (with DoRA and MiCA counted as variants too).

BD-LoRA (use_bdlora): on layers whose path contains a `target_modules_bd_a` pattern, A is block
diagonal with `nblocks` blocks, stored (r, d_in/nblocks); on `target_modules_bd_b` layers B is,
stored (d_out, r/nblocks). x·BD(blocks)ᵀ is one batched matmul over the blocks (PEFT's
BlockDiagonalLinear); merge uses the dense block_diag. A block-diagonal A starts kaiming (a=0).

KaSA (kasa_config): the base weight W = U S Vᵀ loses its r smallest singular components (the new
frozen base, as PiSSA's residual), and the update is ΔW = s·B diag(d) A with a trainable d (r,),
initialised N(0, 1). `m.regularization_loss()` is PEFT's `_get_kasa_loss`:
β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), summed over layers.

VeLoRA (velora_config): the forward is LoRA's; in training the gradient of A is computed from the
inputs compressed to one number per group of `num_groups` features (projected on a unit vector,
`lora_velora_embed`), which is all the backward keeps, as PEFT's VeloraFunction does. The vector is
the normalised mean of the batch's groups ("batch_average": every training call; "batch_average_once":
the first), or a random one ("random").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AdapterShapeError
from .method import Layer


# -- BD-LoRA ------------------------------------------------------------------------------------
def bd_side(spec, layer: Layer) -> str | None:
    """"A" or "B": the factor that is block diagonal on this layer (PEFT: pattern in the module path)."""
    cfg = spec.use_bdlora
    if not cfg:
        return None
    on_a = any(p in layer.fqn for p in cfg.get("target_modules_bd_a") or [])
    on_b = any(p in layer.fqn for p in cfg.get("target_modules_bd_b") or [])
    if on_a and on_b:
        raise AdapterShapeError(f"{layer.fqn}: use_bdlora puts it in both target_modules_bd_a and _bd_b; pick one.")
    if not (on_a or on_b) and cfg.get("match_strict", True):
        raise AdapterShapeError(
            f"{layer.fqn}: matches neither use_bdlora target_modules_bd_a nor _bd_b (match_strict=True, as PEFT); "
            f"add it to one, or set match_strict=False to train it as plain LoRA.")
    return "A" if on_a else ("B" if on_b else None)


def bd_check(spec, layer: Layer, r: int) -> None:
    side = bd_side(spec, layer)
    n = spec.use_bdlora.get("nblocks", 1)
    dims = (layer.in_features, r) if side == "A" else (r, layer.out_features) if side == "B" else ()
    if any(d % n for d in dims):
        raise AdapterShapeError(f"{layer.fqn}: use_bdlora nblocks={n} must divide the block-diagonal factor's "
                                f"dims {dims} (PEFT raises too).")


def block_diag_apply(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """x · BD(w)ᵀ for w stored (out, in/nblocks) (PEFT's BlockDiagonalLinear.forward)."""
    lead = x.shape[:-1]
    xb = x.reshape(-1, nblocks, x.shape[-1] // nblocks)  # (T, nb, m)
    wb = w.view(nblocks, w.shape[0] // nblocks, w.shape[1])  # (nb, n, m)
    return torch.einsum("bim,inm->bin", xb, wb).reshape(*lead, -1)


def block_diag_dense(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    return torch.block_diag(*torch.chunk(w, nblocks, dim=0))


# -- KaSA -----------------------------------------------------------------------------------------
def kasa_base(weight: torch.Tensor, r: int, fqn: str) -> torch.Tensor:
    """W without its r smallest singular components (PEFT's `_truncate_base_weight`)."""
    k = min(weight.shape)
    if r >= k:
        raise AdapterShapeError(f"{fqn}: KaSA needs r ({r}) < min(d_in, d_out) ({k}) so that some of the base "
                                f"weight survives the truncation; lower r.")
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    keep = k - r
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)


def kasa_loss(spec, pairs) -> torch.Tensor | None:
    cfg = spec.kasa_config
    terms = []
    for _, p in pairs:
        d, a, b = p["lora_diag"].float(), p["lora_A"].float(), p["lora_B"].float()
        eye = torch.eye(d.shape[0], device=d.device)
        l2 = (d**2).sum()
        l3 = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
        terms.append(cfg.get("beta", 1e-4) * l2 + cfg.get("gamma", 1e-3) * l3)
    return torch.stack(terms).sum() if terms else None


# -- VeLoRA ---------------------------------------------------------------------------------------
def velora_group_dim(in_features: int, num_groups: int) -> int:
    return (in_features + num_groups - 1) // num_groups


def _grouped(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    group = velora_group_dim(x.shape[-1], num_groups)
    if x.shape[-1] != num_groups * group:
        x = F.pad(x, (0, num_groups * group - x.shape[-1]))
    return x.reshape(-1, num_groups, group)


def _normalised(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    ones = torch.ones_like(v)
    # PEFT: a zero vector becomes the normalised all-ones vector
    return torch.where(norm == 0, ones / torch.linalg.vector_norm(ones), v / norm.clamp_min(1e-30))


def velora_init(layer: Layer, cfg: dict, dtype) -> dict[str, torch.Tensor]:
    group = velora_group_dim(layer.in_features, cfg.get("num_groups", 64))
    if cfg.get("init_type", "batch_average") == "random":
        return {"lora_velora_embed": _normalised(torch.randn(group, dtype=dtype)).to(dtype),
                "lora_velora_initialized": torch.ones((), dtype=torch.bool)}
    return {"lora_velora_embed": torch.zeros(group, dtype=dtype),
            "lora_velora_initialized": torch.zeros((), dtype=torch.bool)}


def velora_embed(p, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The projection vector of this training call, written back into the adapter's buffers."""
    embed, done = p["lora_velora_embed"], p["lora_velora_initialized"]
    init_type = cfg.get("init_type", "batch_average")
    if init_type == "random":
        return embed
    with torch.no_grad():
        fresh = _normalised(_grouped(x.detach(), cfg.get("num_groups", 64)).reshape(-1, embed.shape[0]).mean(0))
        fresh = fresh.to(embed.dtype)
        new = torch.where(done, embed, fresh) if init_type == "batch_average_once" else fresh
        embed.copy_(new)
        done.fill_(True)
    return new


class VeloraLinear(torch.autograd.Function):
    """y = x Aᵀ; the backward keeps only x compressed to one number per feature group, and computes
    dA from its reconstruction (PEFT's VeloraFunction, same arithmetic)."""

    @staticmethod
    def forward(ctx, x, a, embed, num_groups: int, scale: float):
        ctx.x_shape, ctx.x_dtype, ctx.in_features = tuple(x.shape), x.dtype, x.shape[-1]
        ctx.num_groups, ctx.scale = num_groups, scale
        compressed = torch.einsum("tgd,d->tg", _grouped(x, num_groups), embed.to(x.dtype))
        ctx.save_for_backward(compressed, a, embed)
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, grad):
        compressed, a, embed = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ a.to(g2.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (compressed.to(g2.dtype).unsqueeze(-1) * embed.to(g2.dtype).view(1, 1, -1))
            rebuilt = rebuilt.reshape(-1, compressed.shape[-1] * embed.numel())[:, : ctx.in_features] * ctx.scale
            grad_a = (g2.T @ rebuilt).to(a.dtype)
        return grad_x, grad_a, None, None, None
