"""OLoRA (orthonormal LoRA), PEFT's init_lora_weights="olora".

    W = Q R (QR decomposition)     A = R[:r]     B = Q[:, :r]     base = W − s·B A
Linear layers only: PEFT decomposes the weight as stored, which for HF Conv1D's (d_in, d_out)
layout gives factors of the wrong shape.
"""

from __future__ import annotations

import torch

from ._lora_init import Initialiser, InitResult, register_init


def _olora(layer, weight, r, scaling, option):
    w = weight.float()
    q, rr = torch.linalg.qr(w)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return InitResult(a=a, b=b, base=(w - scaling * b @ a).to(weight.dtype))


register_init(Initialiser("olora", _olora, transposed_ok=False))
