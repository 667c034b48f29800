"""MiCA (Minor Component Adaptation), PEFT's init_lora_weights="mica".

B = the r left singular vectors of W with the smallest singular values, A = 0, and B stays frozen:
only A trains. BA = 0 at init, so the base weight is unchanged. Embeddings use Wᵀ (dim, num).
"""

from __future__ import annotations

import torch

from ..errors import AdapterShapeError
from ._lora_init import Initialiser, InitResult, register_init


def _mica(layer, weight, r, scaling, option):
    w = weight.float().T if layer.kind == "embedding" else weight.float()
    if r > min(w.shape):
        raise AdapterShapeError(
            f"{layer.fqn}: MiCA needs r <= min{tuple(w.shape)} = {min(w.shape)}, got r={r}; lower r.")
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    b = u[:, -r:].contiguous().to(weight.dtype)
    return InitResult(a=torch.zeros(r, w.shape[1], dtype=weight.dtype), b=b)


register_init(Initialiser("mica", _mica, kinds=frozenset({"linear", "embedding"}), frozen=frozenset({"lora_B"})))
