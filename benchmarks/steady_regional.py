"""Steady training step, ours lowering="inductor" vs lowering="regional", interleaved in ONE process.

    python -m benchmarks.steady_regional [--layers 2] [--steps 12]

Both modules are built on the same Llama (hidden 256, intermediate 512, 4 heads, vocab 1000, random
weights), LoRA r=8 on q/k/v/o, batch 2 x 64. After two warm-up steps each, the steps alternate
between the two, and the median CPU time (`time.process_time()`, all threads of this process) per
forward + backward is printed: on a shared machine the load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    import adapt_compiler as ac
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                         num_key_value_heads=4, num_hidden_layers=a.layers, vocab_size=1000,
                                         use_cache=False))
    ids = torch.randint(0, 1000, (2, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    mods = {}
    for lowering in ("inductor", "regional"):
        m = ac.compile(model, ac.LoRA(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]), lowering=lowering)
        m.train()
        for _ in range(2):
            m(**batch).loss.backward()
        mods[lowering] = m
    cpu = {k: [] for k in mods}
    for _ in range(a.steps):
        for k, m in mods.items():
            t = time.process_time()
            m(**batch).loss.backward()
            cpu[k].append(time.process_time() - t)
    print(json.dumps({f"{k}_steady_cpu_ms": round(1000 * statistics.median(v), 1) for k, v in cpu.items()}))


if __name__ == "__main__":
    main()
