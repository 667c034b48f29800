"""CorDA (context-oriented decomposition adaptation), PEFT's init_lora_weights="corda": the math.

CorDA decomposes each target weight W (d_out, d_in) *together with* the covariance C of the layer's
inputs over the user's calibration data (each sample's input X scaled by 1 / max(X), C = mean XᵀX):

    C' = C + damp·mean(diag C)·I        (damp 0.01, doubled until ‖C'·C'⁻¹ − I‖ < 0.05)
    W C' = U S Vhᵀ                      V = (Vh C'⁻¹)ᵀ, so W = U S Vᵀ
    ipm: the r largest components,  kpm: the r smallest ("knowledge-preserved": the adapter starts in
    the directions the data uses least)
    A = diag(√(S_r / s)) V_rᵀ     B = U_r diag(√(S_r / s))     base = W − s·B A   (the residual)

so the adapted layer computes W at init. PEFT overwrites the model's weight with the residual; this
library never modifies the user's model, so the residual goes into our frozen copy of the weight (as
for PiSSA / OLoRA; `report()` lists it, delete_adapter restores W). A saved CorDA directory means
"these A, B over that residual": like PEFT, loading it needs the decomposition again, from the same
data (ac.preprocess_corda) or from corda_config's cache_file (the eigens PEFT and we save there).

The same sequence of torch operations as PEFT 0.21.2 (`peft/tuners/lora/corda.py`, `LoraLayer.corda_init`),
so the factors agree to float rounding. The data pass is in `data_init/corda.py`.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError
from ._lora_init import Initialiser, InitResult, peft_sub_config, register_init

# PEFT's CordaConfig fields and defaults
CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}


def corda_config_of(config: dict | None) -> dict:
    config = peft_sub_config(config, "corda_config", CORDA_DEFAULTS, "CordaConfig")
    if config["corda_method"] not in ("ipm", "kpm"):
        raise AdapterError(f"LoRA: corda_config corda_method={config['corda_method']!r} must be 'ipm' or 'kpm'.")
    return config


def sample_covariance(x: torch.Tensor, fqn: str, float16: bool = False) -> torch.Tensor:
    """XᵀX of one call's layer input, X scaled by 1 / max(X) as PEFT's hook scales it. PEFT squeezes
    the batch dimension away and multiplies Xᵀ X, so it takes one sample per call (batch size 1)."""
    x = x.detach().squeeze(0)
    if x.dim() != 2:
        raise AdapterError(
            f"{fqn}: CorDA reads one sample per forward call (PEFT's preprocess_corda squeezes the batch dimension "
            f"and fails on a batch); this layer's input has shape {tuple(x.shape)}. Run the calibration data with "
            f"batch size 1.")
    if not float16:
        x = x.float()
    x = x / torch.max(x).abs()
    if torch.isnan(x).any() or torch.isinf(x).any():
        raise AdapterError(f"{fqn}: CorDA found NaN/inf in this layer's input; check the calibration data.")
    return x.t().matmul(x)


def eigens(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, U, V) of W with the (damped) covariance, all min(d_out, d_in) components."""
    w = weight.float()
    cov = covariance.float()
    damp = 0.01
    eye = torch.eye(cov.size(0), device=cov.device)
    while True:
        fixed = cov + torch.diag(torch.ones(cov.size(0), device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp = damp * 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return S, U, (Vh @ inv).transpose(0, 1)


def crop(eig: tuple, rank: int, method: str) -> tuple:
    """ipm: the `rank` largest components; kpm: the `rank` smallest."""
    S, U, V = eig
    if method == "ipm":
        return S[:rank].clone(), U[:, :rank].clone(), V[:, :rank].clone()
    return S[-rank:].clone(), U[:, -rank:].clone(), V[:, -rank:].clone()


def corda_factors(weight: torch.Tensor, eig: tuple, scaling: float, fqn: str) -> InitResult:
    """A, B and the residual base from a layer's cropped eigens (weight: canonical (d_out, d_in))."""
    S, U, V = eig
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterError(f"{fqn}: CorDA runs on float32/float16/bfloat16 weights (PEFT's rule), got {weight.dtype}.")
    r = S.size(0)
    d_out, d_in = weight.shape
    if U.shape != (d_out, r) or V.shape != (d_in, r):
        raise AdapterError(f"{fqn}: CorDA eigens of shapes U {tuple(U.shape)}, V {tuple(V.shape)} do not fit a "
                           f"{tuple(weight.shape)} weight at rank {r}; the cache_file was built for another model or "
                           f"rank.")
    for name, t in (("S", S), ("U", U), ("V", V)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise AdapterError(f"{fqn}: CorDA's decomposition has NaN/inf in {name}; the covariance is degenerate "
                               f"(more, or more varied, calibration samples help).")
    S = S / scaling
    a = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    b = U.mul(S.sqrt()).contiguous()
    base = (weight.to(torch.float32) - scaling * b @ a).to(weight.dtype)
    return InitResult(a=a, b=b, base=base)


register_init(Initialiser("corda", None, data=True, notes="data pass: ac.preprocess_corda (data_init/corda.py)"))
