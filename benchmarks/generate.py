"""Generation tokens/s, side by side in one run (issue 21): `python -m benchmarks.generate`.

    python -m benchmarks.generate                      # standard model, prompt 128, 128 new tokens, batch 1 and 8
    python -m benchmarks.generate --quick              # tiny model and lengths: checks the script runs
    python -m benchmarks.generate --batches 1 --new 33 --repeats 3 --clock thread
                                                       # standard model, shorter; CPU time of one thread

Rows (greedy, same LoRA r=16 on q/k/v/o, float32):
  ours            ac.compile(..., lowering="inductor"), unmerged, m.generate(cache_implementation="static")
  ours merged     the same with the adapter folded in (ac.compile(..., merge=True))
  peft            PEFT's generate (eager, DynamicCache: what PEFT users run)
  peft merged+compile  merge_and_unload() + generate(cache_implementation="static"): HF torch.compiles the
                  decode forward itself for a static cache
  ours mixed8     batch 8 only: 8 different adapters, one per row (adapter_names=), vs "ours" at batch 8
  ours pool8      the same 8 adapters in a serving pool (max_adapters=8, max_rank=16: stacked once, not per
                  call), one per row, vs "ours" at batch 8
Decode tokens/s = batch * (new - 1) / (time(new tokens) - time(1 token)): the prefill cancels out. Every
row gets one warm-up call (captures/compiles) first; then the rows are timed in turns, --repeats rounds
of (1 token, `new` tokens) per row, and each row's median is reported, so a change in the machine's load
hits every row alike. Results are printed as a table and written to benchmarks/results_generate.json
with the load average at the start and end. `--clock thread` times with the CPU time of the calling
thread and runs torch on one thread: on a shared machine it leaves out the time the process waits for
a core (wall clock, the default, is what a user sees on a quiet machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def decode_tokens_per_s(rows: dict, ids, new: int, repeats: int, clock: str = "wall") -> dict:
    """Decode tokens/s of each row's `generate(input_ids=..., max_new_tokens=...)`, prefill subtracted.
    rows: name -> (generate, extra kwargs). Warm-up first, then the rows in turns (see the module doc)."""
    now = CLOCKS[clock]
    base = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)
    per_token = {name: [] for name in rows}
    with torch.no_grad():
        for generate, kw in rows.values():
            generate(**base, **kw, max_new_tokens=new)  # warm-up: capture + compile
        for _ in range(repeats):
            for name, (generate, kw) in rows.items():
                t = now()
                generate(**base, **kw, max_new_tokens=1)
                one = now() - t
                t = now()
                generate(**base, **kw, max_new_tokens=new)
                per_token[name].append((now() - t - one) / (new - 1))
    return {name: ids.shape[0] / max(statistics.median(v), 1e-12) for name, v in per_token.items()}


def main(quick: bool = False, prompt: int = 128, new: int = 128, batches=(1, 8), repeats: int = 3,
         out: Path | None = HERE / "results_generate.json", clock: str = "wall") -> dict:
    import peft
    from peft import PeftModel

    import adapt_compiler as ac

    if quick:
        prompt, new, repeats = 8, 8, 1
    model = _tiny_model() if quick else standard_model()
    vocab = model.config.vocab_size
    static = dict(cache_implementation="static")
    if clock == "thread":
        torch.set_num_threads(1)  # thread CPU time counts this thread's work only
    results: dict = {"prompt": prompt, "new": new, "clock": clock, "threads": torch.get_num_threads(),
                     "load_before": os.getloadavg(), "rows": {}}
    with tempfile.TemporaryDirectory() as root:
        dirs = _adapter_dirs(model, root, n=8)
        ours = ac.compile(model, dirs[0], lowering="inductor").eval()
        merged = ac.compile(model, dirs[0], lowering="inductor", merge=True).eval()
        pm = PeftModel.from_pretrained(copy.deepcopy(model), dirs[0]).eval()
        pm_merged = PeftModel.from_pretrained(copy.deepcopy(model), dirs[0]).merge_and_unload().eval()
        mixed = ac.compile(model, dirs[0], lowering="inductor", adapter_name="a0").eval()
        pool = ac.compile(model, dirs[0], lowering="inductor", adapter_name="a0",
                          max_adapters=8, max_rank=16).eval()
        for i, d in enumerate(dirs[1:], 1):
            mixed.load_adapter(d, f"a{i}")
            pool.load_adapter(d, f"a{i}")
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
            rows = {
                "ours": (ours.generate, static),
                "ours merged": (merged.generate, static),
                "peft": (pm.generate, {}),
                "peft merged+compile": (pm_merged.generate, static),
            }
            if batch == 8:
                names = [f"a{i}" for i in range(8)]
                rows["ours mixed8"] = (mixed.generate, dict(static, adapter_names=names))
                rows["ours pool8"] = (pool.generate, dict(static, adapter_names=names))
            row = decode_tokens_per_s(rows, ids, new, repeats, clock)
            if batch == 8:
                row["ours mixed8 / ours"] = row["ours mixed8"] / row["ours"]
                row["ours pool8 / ours"] = row["ours pool8"] / row["ours"]
            row["ours / ours merged"] = row["ours"] / row["ours merged"]
            row["ours / peft"] = row["ours"] / row["peft"]
            row["ours / peft merged+compile"] = row["ours"] / row["peft merged+compile"]
            results["rows"][f"batch {batch}"] = row
    results["load_after"] = os.getloadavg()
    print(f"decode tokens/s, prompt {prompt}, {new} new tokens ({'quick' if quick else 'standard model'}; {clock} "
          f"clock, {results['threads']} threads; load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f})")
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
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    a = p.parse_args()
    main(a.quick, a.prompt, a.new, tuple(int(b) for b in a.batches.split(",")), a.repeats, Path(a.out), a.clock)
