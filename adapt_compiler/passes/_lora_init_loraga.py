"""LoRA-GA (low-rank gradient approximation), PEFT's init_lora_weights="lora_ga": the math.

LoRA-GA starts LoRA in the direction full fine-tuning would move: G is the gradient of the loss with
respect to the layer's base weight W (d_out, d_in), averaged over the backward passes of the user's
training step(s), with no adapter present. Then

    G ≈ U S Vᵀ                     torch.svd_lowrank(G, q=min(4r, min(G.shape)), niter=4), 2r components kept
    direction  ArB2r: A = V[:, :r]ᵀ,  B = U[:, r:2r]·diag(S[r:2r])      (PEFT's default)
               A2rBr: A = V[:, r:2r]ᵀ, B = U[:, :r]·diag(S[:r])
               ArBr:  A = odd components, B = even components
               random: r of the 2r components drawn with torch.randperm
    scale      stable: B ·= d^¼ / √stable_gamma   (d = the weight's *stored* first dimension: d_out for
                       nn.Linear, d_in for HF Conv1D, which stores Wᵀ; PEFT reads weight.shape[0])
               weight_svd: B ·= σ₁(W) / S_B[0]  (σ₁ from torch.svd_lowrank(W, q=r, niter=4)), if S_B[0] > 0
               gd_scale: A /= s, B /= s         unit: nothing
    A, B are cast to the weight's dtype, and base = (W − s·B A in float32) in the weight's dtype,
so the adapted layer computes W at init. As for PiSSA / CorDA, PEFT overwrites the model's weight with that
residual; here it goes into our frozen copy (the user's model is untouched).

svd_lowrank and randperm draw from the global generator, so PEFT's factors depend on the generator's state in
get_peft_model, where PEFT draws, per target layer in module order: nn.Linear's init of lora_A and lora_B (two
kaiming-uniform draws), then the SVD's draws. `replay_peft_draws` repeats that sequence from the state saved
when our adapter was created: the same seed before ac.compile as before get_peft_model gives the same factors.

The same sequence of torch operations as PEFT 0.21.2 (`LoraLayer.lora_ga_init`); the data pass (the
gradients) is in data_init/loraga.py.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ..errors import AdapterError
from ._lora_init import Initialiser, InitResult, peft_sub_config, register_init

# PEFT's LoraGAConfig fields and defaults
LORAGA_DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def lora_ga_config_of(config: dict | None) -> dict:
    """PEFT's LoraGAConfig as a dict, checked: PEFT does not check these values, and an unknown direction then
    fails inside get_peft_model (an unbound variable) while an unknown scale silently means "unit"."""
    config = peft_sub_config(config, "lora_ga_config", LORAGA_DEFAULTS, "LoraGAConfig")
    if config["direction"] not in DIRECTIONS:
        raise AdapterError(f"LoRA: lora_ga_config direction={config['direction']!r} must be one of {list(DIRECTIONS)} "
                           f"(PEFT's LoraGAConfig).")
    if config["scale"] not in SCALES:
        raise AdapterError(f"LoRA: lora_ga_config scale={config['scale']!r} must be one of {list(SCALES)} "
                           f"(PEFT's LoraGAConfig).")
    gamma = config["stable_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        raise AdapterError(f"LoRA: lora_ga_config stable_gamma={gamma!r} must be a positive number.")
    return config


def peft_linear_draws(d_in: int, d_out: int, r: int) -> None:
    """The draws of PEFT's nn.Linear(d_in, r) and nn.Linear(r, d_out) (lora_A, lora_B) before its init runs."""
    nn.init.kaiming_uniform_(torch.empty(r, d_in), a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(d_out, r), a=math.sqrt(5))


def loraga_factors(weight: torch.Tensor, grad: torch.Tensor, transposed: bool, r: int, scaling: float, cfg: dict,
                   fqn: str) -> InitResult:
    """A, B and the residual base (canonical (d_out, d_in)) from the stored weight and its averaged gradient
    (both in the stored layout: (d_in, d_out) for HF Conv1D), exactly as PEFT's lora_ga_init."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise AdapterError(f"{fqn}: LoRA-GA needs a floating-point weight, got {weight.dtype}.")
    if grad.shape != weight.shape:
        raise AdapterError(f"{fqn}: LoRA-GA gradient of shape {tuple(grad.shape)} does not fit the {tuple(weight.shape)} "
                           f"weight; the cache_file was built for another model.")
    dtype = weight.dtype
    g = grad.to(torch.float32)
    g = g.t() if transposed else g
    if not torch.isfinite(g).all():
        raise AdapterError(f"{fqn}: LoRA-GA's gradient has NaN/inf; check the training step's loss.")
    U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
    Vh = V.t()
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], Vh[: 2 * r, :]
    direction = cfg["direction"]
    if direction == "ArBr":
        a, b, s_b = Vh[1: 2 * r: 2, :], U[:, 0: 2 * r: 2], S[0: 2 * r: 2]
    elif direction == "A2rBr":
        a, b, s_b = Vh[r: 2 * r, :], U[:, :r], S[:r]
    elif direction == "ArB2r":
        a, b, s_b = Vh[:r, :], U[:, r: 2 * r], S[r: 2 * r]
    else:  # random
        indices = torch.randperm(2 * r)[:r]
        a, b, s_b = Vh[indices, :], U[:, indices], S[indices]
    b = b @ torch.diag(s_b)
    if cfg["scale"] == "stable":
        b = b * ((weight.shape[0] ** 0.25) / (cfg["stable_gamma"] ** 0.5))  # PEFT: the stored shape[0]
    elif cfg["scale"] == "weight_svd":
        w = weight.to(torch.float32)
        _, weight_s, _ = torch.svd_lowrank(w.t() if transposed else w, q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif cfg["scale"] == "gd_scale":
        a, b = a / scaling, b / scaling
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    w = weight.to(torch.float32)
    w = w.t() if transposed else w
    base = (w - scaling * (b.float() @ a.float())).to(dtype)
    return InitResult(a=a, b=b, base=base)


register_init(Initialiser("lora_ga", None, data=True, rng=True,
                          notes="data pass: ac.preprocess_loraga (data_init/loraga.py)"))
