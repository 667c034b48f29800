"""Generation tokens/s, side by side in one run (issue 21): `python -m benchmarks.generate`.

    python -m benchmarks.generate                      # standard model, prompt 128, 128 new tokens, batch 1 and 8
    python -m benchmarks.generate --quick              # tiny model and lengths: checks the script runs

Rows (greedy, same LoRA r=16 on q/k/v/o, float32):
  ours            ac.compile(..., lowering="inductor"), unmerged, m.generate(cache_implementation="static")
  ours merged     the same with the adapter folded in (ac.compile(..., merge=True))
  peft            PEFT's generate (eager, DynamicCache: what PEFT users run)
  peft merged+compile  merge_and_unload() + generate(cache_implementation="static"): HF torch.compiles the
                  decode forward itself for a static cache
  ours mixed8     batch 8 only: 8 different adapters, one per row (adapter_names=), vs "ours" at batch 8
Decode tokens/s = batch * (new - 1) / (time(new tokens) - time(1 token)): the prefill cancels out. Each
row: one warm-up call (captures/compiles), then the median of --repeats timed calls. Results are printed
as a table and written to benchmarks/results_generate.json. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .methods import ATTN
from .run import randomize, standard_model

HERE = Path(__file__).parent


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=2000,
                                        max_position_embeddings=512, use_cache=False)).eval()


def _adapter_dirs(model, root: str, n: int, r: int = 16) -> list[str]:
    import peft

    dirs = []
    for i in range(n):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTN))
        randomize([p for name, p in pm.named_parameters() if "lora_" in name], seed=i)
        pm.save_pretrained(f"{root}/a{i}")
        dirs.append(f"{root}/a{i}")
    return dirs


def _seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_tokens_per_s(generate, ids, new: int, repeats: int, **kw) -> float:
    """Decode tokens/s of `generate(input_ids=..., max_new_tokens=...)`, prefill subtracted."""
    args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                pad_token_id=0, **kw)
    with torch.no_grad():
        generate(**args, max_new_tokens=new)  # warm-up: capture + compile
        one = _seconds(lambda: generate(**args, max_new_tokens=1), repeats)
        full = _seconds(lambda: generate(**args, max_new_tokens=new), repeats)
    return ids.shape[0] * (new - 1) / max(full - one, 1e-9)


def main(quick: bool = False, prompt: int = 128, new: int = 128, batches=(1, 8), repeats: int = 3,
         out: Path | None = HERE / "results_generate.json") -> dict:
    import peft
    from peft import PeftModel

    import adapt_compiler as ac

    if quick:
        prompt, new, repeats = 8, 8, 1
    model = _tiny_model() if quick else standard_model()
    vocab = model.config.vocab_size
    static = dict(cache_implementation="static")
    results: dict = {"prompt": prompt, "new": new, "rows": {}}
    with tempfile.TemporaryDirectory() as root:
        dirs = _adapter_dirs(model, root, n=8)
        ours = ac.compile(model, dirs[0], lowering="inductor").eval()
        merged = ac.compile(model, dirs[0], lowering="inductor", merge=True).eval()
        pm = PeftModel.from_pretrained(copy.deepcopy(model), dirs[0]).eval()
        pm_merged = PeftModel.from_pretrained(copy.deepcopy(model), dirs[0]).merge_and_unload().eval()
        mixed = ac.compile(model, dirs[0], lowering="inductor", adapter_name="a0").eval()
        for i, d in enumerate(dirs[1:], 1):
            mixed.load_adapter(d, f"a{i}")
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
            row = {
                "ours": decode_tokens_per_s(ours.generate, ids, new, repeats, **static),
                "ours merged": decode_tokens_per_s(merged.generate, ids, new, repeats, **static),
                "peft": decode_tokens_per_s(pm.generate, ids, new, repeats),
                "peft merged+compile": decode_tokens_per_s(pm_merged.generate, ids, new, repeats, **static),
            }
            if batch == 8:
                names = [f"a{i}" for i in range(8)]
                row["ours mixed8"] = decode_tokens_per_s(mixed.generate, ids, new, repeats, adapter_names=names,
                                                         **static)
                row["ours mixed8 / ours"] = row["ours mixed8"] / row["ours"]
            row["ours / ours merged"] = row["ours"] / row["ours merged"]
            row["ours / peft"] = row["ours"] / row["peft"]
            row["ours / peft merged+compile"] = row["ours"] / row["peft merged+compile"]
            results["rows"][f"batch {batch}"] = row
    print(f"decode tokens/s, prompt {prompt}, {new} new tokens ({'quick' if quick else 'standard model'})")
    for name, row in results["rows"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    del peft  # imported only to fail early without it
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results_generate.json"))
    a = p.parse_args()
    main(a.quick, a.prompt, a.new, tuple(int(b) for b in a.batches.split(",")), a.repeats, Path(a.out))
