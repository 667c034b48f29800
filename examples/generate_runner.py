"""Generate with a package from `ac.export(m, ..., generate=True)` + `ac.package`: torch only.

    python examples/generate_runner.py gen.pt2 --prompt-ids 5,7,9 --max-new-tokens 16 [--eos 2]
    python examples/generate_runner.py gen.pt2 --prompt-ids 5,7,9 --adapter other_adapter.pt

Needs neither adapt_compiler nor transformers: the package holds two AOTInductor models, "prefill"
and "decode", and its metadata says which tensors they take (see adapt_compiler/generation_export.py).
This loop is greedy decoding as `generate(do_sample=False)` does it: left-padded prompts, position ids
from the attention mask, finished rows padded with `pad` after their eos. `--adapter FILE` (a
`torch.save` of `ac.adapter_constants(m, "other", as_name=<the exported adapter>)`) swaps the adapter
into both models with `load_constants`, without recompiling.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def load(package: str):
    """(prefill, decode, metadata) of a generation package."""
    from torch._inductor.package import load_package

    prefill, decode = load_package(package, "prefill"), load_package(package, "decode")
    return prefill, decode, json.loads(decode.get_metadata()["ac_generation"])


def swap_adapter(models, constants: dict) -> None:
    for model in models:
        model.load_constants(constants, check_full_update=False)


def new_cache(meta: dict) -> list[torch.Tensor]:
    return [torch.zeros(c["shape"], dtype=getattr(torch, c["dtype"])) for c in meta["cache"]]


@torch.no_grad()
def generate(prefill, decode, meta: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 16, eos: int | None = None, pad: int = 0) -> torch.Tensor:
    """Greedy tokens [B, prompt + new] (prompt rows left-padded; `attention_mask` 0 on the padding)."""
    batch, prompt = input_ids.shape
    length = meta["max_cache_len"]
    if batch != meta["batch"]:
        raise ValueError(f"the package was exported for batch {meta['batch']}, got {batch} prompts")
    if prompt + max_new_tokens > length:
        raise ValueError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceed the cache ({length})")
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, :prompt] = attention_mask if attention_mask is not None else 1
    positions = mask[:, :prompt].cumsum(-1) - 1
    positions = positions.masked_fill(mask[:, :prompt] == 0, 1)
    cache = new_cache(meta)
    step = prefill if prompt > 1 else decode
    logits = step(input_ids, mask, positions, *cache)[0]
    tokens = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos is not None:
            unfinished &= nxt != eos
            if not unfinished.any():
                break
        if i == max_new_tokens - 1:
            break
        mask[:, prompt + i] = 1
        positions = positions[:, -1:] + 1
        logits = decode(nxt[:, None], mask, positions, *cache)[0]
    return tokens


def main(package: str, prompt_ids: list[int], max_new_tokens: int = 16, eos: int | None = None,
         adapter: str | None = None, quiet: bool = False) -> dict:
    prefill, decode, meta = load(package)
    if adapter is not None:
        swap_adapter((prefill, decode), torch.load(adapter, weights_only=True))
    ids = torch.tensor([prompt_ids] * meta["batch"])
    generate(prefill, decode, meta, ids, max_new_tokens=2, eos=eos)  # warm-up
    start = time.perf_counter()
    tokens = generate(prefill, decode, meta, ids, max_new_tokens=max_new_tokens, eos=eos)
    seconds = time.perf_counter() - start
    new = tokens.shape[1] - ids.shape[1]
    if not quiet:
        print("tokens:", tokens[0, ids.shape[1]:].tolist())
        print(f"{new * ids.shape[0] / seconds:.1f} tokens/s ({new} new tokens x {ids.shape[0]} rows, {seconds:.3f} s)")
    return {"tokens": tokens, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eos", type=int, default=None)
    parser.add_argument("--adapter", default=None, help="torch.save'd adapter constants to swap in")
    a = parser.parse_args()
    main(a.package, [int(t) for t in a.prompt_ids.split(",")], a.max_new_tokens, a.eos, a.adapter)
