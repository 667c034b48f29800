"""PiSSA (principal singular values and vectors), PEFT's init_lora_weights="pissa" / "pissa_niter_<k>".

    W = V S Uᵀ (SVD, or torch.svd_lowrank with k subspace iterations for pissa_niter_<k>)
    A = diag(√(S_r / s)) U_rᵀ     B = V_r diag(√(S_r / s))     base = W − s·B A
so the adapted layer computes W at init, and the adapter holds W's principal part. A and B are
float32 (PEFT keeps the SVD's dtype); the residual is cast to the weight's dtype.
"""

from __future__ import annotations

import torch

from ._lora_init import Initialiser, InitResult, register_init


def _pissa(layer, weight, r, scaling, option):
    w = weight.float()
    if option:  # fast SVD: PEFT calls torch.svd_lowrank(W, r, niter=k) (random, seed it for repeatability)
        v, s, u = torch.svd_lowrank(w, r, niter=int(option))
        uh = u.t()
    else:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    s = s / scaling
    a = torch.diag(torch.sqrt(s)) @ uh
    b = v @ torch.diag(torch.sqrt(s))
    return InitResult(a=a, b=b, base=(w - scaling * b @ a).to(weight.dtype))


register_init(Initialiser("pissa", _pissa, pattern=r"pissa_niter_(\d+)"))
