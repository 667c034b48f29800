"""One measurement per fresh process: the scripts that time a first step (first_step, warm_start,
auto_switch) run `python -m <script> one ...` in a child with its own Inductor cache dir and read
the JSON line it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(module: str, args: list[str], cache: str, failed: dict, threads: str = "2", **env) -> dict:
    """The child's last JSON line plus the load average when it ended, or `failed` plus its error.
    Compile threads 1, so C++ compiles count in the child's CPU time."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads), TORCHINDUCTOR_CACHE_DIR=cache,
               TORCHINDUCTOR_COMPILE_THREADS="1", PYTHONWARNINGS="ignore", ADAPT_COMPILER_QUIET="1", **env)
    p = subprocess.run([sys.executable, "-m", module, "one", *args], env=env, capture_output=True, text=True,
                       timeout=7200)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {**failed, "error": (p.stderr or p.stdout)[-1500:]}
    res = json.loads(lines[-1])
    res["load1"] = os.getloadavg()[0]
    return res


def llama_and_batch(hidden: int, inter: int, layers: int):
    """The first-step scripts' model (Llama, 4 heads, vocab 1000, random init) and batch (2 x 64 tokens,
    labels = inputs), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4,
                                         num_key_value_heads=4, num_hidden_layers=layers, vocab_size=1000,
                                         use_cache=False))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 64), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
