"""Inference overhead measured interleaved (issue 6's "merged ≤ 1.01×, unmerged ≤ 1.03× base").

On a shared 2-core machine, timings drift by 10–30 % between minutes, which swamps a 1–3 %
overhead when the base and the adapted model are timed minutes apart. Here the compiled base,
our unmerged LoRA module and our merged one run in turns (base, unmerged, merged, base, ...) and
each gets the median of its turns, so drift hits all three alike.
"""

from __future__ import annotations

import torch

from .methods import ATTN
from .run import infer_fn, randomize, time_in_turns


def bench_interleaved_inference(model, batch, rounds: int = 30) -> dict:
    import copy

    import adapt_compiler as ac

    base = torch.compile(copy.deepcopy(model).eval())
    unmerged = ac.compile(model, ac.LoRA(r=16, alpha=32, targets=ATTN)).eval()
    randomize(unmerged.adapter_parameters())
    merged = ac.compile(model, ac.LoRA(r=16, alpha=32, targets=ATTN)).eval()
    randomize(merged.adapter_parameters())  # the values do not matter for timing, only that ΔW ≠ 0
    merged.merge()
    runs = {"base_compiled": infer_fn(base, batch), "ours_unmerged": infer_fn(unmerged, batch),
            "ours_merged": infer_fn(merged, batch)}
    out = {f"{k}_ms": v for k, v in time_in_turns(runs, rounds).items()}  # warm-up compiles
    out["rounds"] = rounds
    return out


def interleaved_table(results) -> str:
    r = results.get("infer_interleaved")
    if not r or "base_compiled_ms" not in r:
        return ""
    b = r["base_compiled_ms"]
    return "\n".join([
        f"Inference overhead, interleaved ({r['rounds']} rounds of base / unmerged / merged in turn, LoRA r=16 q/k/v/o):",
        "",
        "| compiled base | ours unmerged | ours merged |",
        "|---|---|---|",
        f"| {b:.1f} ms (1.00×) | {r['ours_unmerged_ms']:.1f} ms ({r['ours_unmerged_ms'] / b:.2f}×) "
        f"| {r['ours_merged_ms']:.1f} ms ({r['ours_merged_ms'] / b:.2f}×) |",
        "",
    ])
