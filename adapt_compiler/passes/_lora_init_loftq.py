"""LoftQ initialisation of LoRA over a bitsandbytes 4-bit base (PEFT 0.21.2 `utils/loftq_utils.py`).

LoftQ starts LoRA where the quantization lost information: with W the original full-precision
weight and Q = dequantize(W4) what the 4-bit base computes with,

    W − Q ≈ B·A,    B = U_r·√S_r  (d_out, r),    A = √S_r·Vh_r  (r, d_in)    (truncated SVD of W − Q)

so the adapted layer starts close to the unquantized one. This is PEFT's `_loftq_init_new`, the
algorithm of `replace_lora_weights_loftq` for an already quantized model, written the same way
(`_low_rank_decomposition`); over a base quantized nf4 without double quantization it also equals
PEFT's `loftq_init(W, num_bits=4, num_iter=1)`, whose Q is exactly that base. PEFT's own code hard-codes
CUDA/XPU (and its LoftQ config needs scipy); this runs on any device with the base's own dequantize.

More LoftQ iterations alternate between re-quantizing W − B·A and re-fitting B·A, which changes the
quantized base itself; PEFT's `loftq_config` path does that by overwriting the model's weights, which
this library never does to a user's model, so over an existing 4-bit base the iteration count is 1.

The original weights are read, one layer at a time, from the model's safetensors checkpoint
(`loftq_config["model_path"]`: a `.safetensors` file or a directory with `model.safetensors` or a
sharded index), as PEFT's `replace_lora_weights_loftq(model_path=...)` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import AdapterError

LOFTQ_KEYS = {"loftq_bits", "loftq_iter", "model_path"}


def check_loftq_config(config) -> None:
    """Validate `LoRA(init="loftq", loftq_config=...)` when the spec is built."""
    if not isinstance(config, dict) or not config:
        raise AdapterError(
            "LoRA: init='loftq' needs loftq_config={'loftq_bits': 4, 'loftq_iter': 1, 'model_path': <the "
            "unquantized checkpoint: a .safetensors file or its directory>} (PEFT's LoftQConfig fields)."
        )
    unknown = sorted(set(config) - LOFTQ_KEYS)
    if unknown:
        raise AdapterError(f"LoRA: loftq_config has unknown keys {unknown}; known: {sorted(LOFTQ_KEYS)}.")
    if config.get("loftq_bits", 4) != 4:
        raise AdapterError(f"LoRA: loftq_config loftq_bits={config['loftq_bits']!r}: LoftQ over an existing "
                           f"quantized base supports 4 bits (bitsandbytes nf4/fp4), as PEFT's does.")
    if config.get("loftq_iter", 1) != 1:
        raise AdapterError(
            f"LoRA: loftq_config loftq_iter={config['loftq_iter']!r}: over an existing 4-bit base LoftQ runs one "
            f"iteration (more would re-quantize the base, i.e. change your model's weights); use loftq_iter=1."
        )
    if not config.get("model_path"):
        raise AdapterError(
            "LoRA: loftq_config needs 'model_path': the unquantized checkpoint (a .safetensors file or the "
            "directory the model was loaded from), where LoftQ reads each target's original weight."
        )


def loftq_weights(spec, layer, weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, d_in), lora_B (d_out, r)) for one layer; `weight` is the base's dequantized W."""
    if layer.quant is None or layer.quant.kind != "bnb_4bit":
        what = "an unquantized layer" if layer.quant is None else f"a {layer.quant.scheme} layer"
        raise AdapterError(
            f"{layer.fqn}: LoftQ initialises LoRA over a bitsandbytes 4-bit base, and this is {what}. Fix: load the "
            f"model with BitsAndBytesConfig(load_in_4bit=True, ...) and keep init='loftq', or use init=True here "
            f"(PEFT's full-precision LoftQ path overwrites the base weights, which this library never does)."
        )
    original = _read_original(spec.loftq_config["model_path"], layer.fqn, tuple(layer.weight_shape))
    residual = original.to(torch.float32) - weight  # PEFT: weight.to(float32) - dequantized_weight
    out = _low_rank_decomposition(residual, reduced_rank=r)
    return out["R"], out["L"]  # lora_A, lora_B


def _low_rank_decomposition(weight: torch.Tensor, reduced_rank: int) -> dict:
    """PEFT's `_low_rank_decomposition`, written the same way (bit-identical factors)."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    L = U @ (torch.sqrt(torch.diag(S)[:, 0:reduced_rank]))
    R = torch.sqrt(torch.diag(S)[0:reduced_rank, :]) @ Vh
    return {"L": L, "R": R, "U": U, "S": S, "Vh": Vh, "reduced_rank": reduced_rank}


def _read_original(model_path, fqn: str, shape: tuple) -> torch.Tensor:
    """`<fqn>.weight` from a safetensors checkpoint (a file, a directory, or a sharded directory);
    like PEFT, a key saved without the model's base prefix (`model.`) is found too."""
    from safetensors import safe_open

    path = Path(model_path)
    files = _shards(path)
    name = fqn + ".weight"
    candidates = [name] + ([name.split(".", 1)[1]] if "." in name else [])
    for key in candidates:
        file = files.get(key) if isinstance(files, dict) else files
        if file is None:
            continue
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if key in f.keys():
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != shape:
                    raise AdapterError(f"{file}: {key} has shape {tuple(tensor.shape)}, the layer {shape}; "
                                       f"loftq_config['model_path'] must be the checkpoint this model was quantized from.")
                return tensor
    raise AdapterError(f"{model_path}: no tensor {name!r} for LoftQ; loftq_config['model_path'] must be the "
                       f"unquantized checkpoint this model was quantized from.")


def _shards(path: Path):
    """The one safetensors file, or {key: file} of a sharded checkpoint."""
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    raise AdapterError(f"{path}: neither a .safetensors file nor a directory with model.safetensors (or a sharded "
                       f"index); LoftQ reads the unquantized weights from there (PEFT cannot read .bin files either).")
