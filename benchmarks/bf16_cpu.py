"""A bf16 training step on the CPU, ours beside PEFT: what the column-major rewrite (lowering/half_gemm.py) buys.

    python -m benchmarks.bf16_cpu              # every row, each in a fresh process; writes results_bf16_cpu.json
    python -m benchmarks.bf16_cpu --steps 3    # fewer steps per row

Each row runs in a child (benchmarks/child.run_child): a new Inductor cache dir, compile threads 1.

Model: a Llama-shaped config (hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 8000) in bf16 with
random weights; LoRA r=8, alpha 16 on q/k/v/o in float32 (PEFT's default autocast); AdamW; batch 1 x 128
tokens with labels. Rows:

    ours                ac.compile(..., lowering="regional") on this CPU as it is
    ours, no rewrite    the same with half_gemm.slow_half_gemm forced False (verify=False: its eager
                        reference would be the slow path too)
    peft                PEFT eager
    peft + compile      PEFT under torch.compile (Inductor)

Each row reports every step's wall time; the first includes capture/compile. On a CPU with native bf16
(AVX512-BF16 or AMX) the first two rows are the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.child import run_child

HERE = Path(__file__).parent
ROWS = ("ours", "ours, no rewrite", "peft", "peft + compile")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def child(row: str, steps: int) -> dict:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapt_compiler as ac
    from adapt_compiler.lowering import half_gemm

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=8000, use_cache=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).requires_grad_(False)
    if row.startswith("ours"):
        if row == "ours, no rewrite":
            half_gemm.slow_half_gemm = lambda dtype: False
        net = ac.compile(model, ac.LoRA(r=8, alpha=16, targets=TARGETS), lowering="regional", verify=row == "ours")
        for p in net.adapter_parameters():
            p.data = p.data.float()
        params = net.adapter_parameters()
    else:
        net = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    forward = torch.compile(net) if row == "peft + compile" else net
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall.append(round(time.perf_counter() - t, 3))
    return {"row": row, "step_wall_s": wall, "loss": round(float(loss), 5),
            "slow_half_gemm": half_gemm.slow_half_gemm(torch.bfloat16)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one"]:  # a child (benchmarks/child.py): one row, its result as the last JSON line
        row, steps = argv[1], int(argv[2])
        print(json.dumps(child(row, steps)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results_bf16_cpu.json"))
    args = p.parse_args(argv)
    results = []
    for row in ROWS:
        res = run_child("benchmarks.bf16_cpu", [row, str(args.steps)], tempfile.mkdtemp(prefix="bf16_cpu_"),
                        {"row": row})
        print(json.dumps(res), flush=True)
        results.append(res)
    steady = {r["row"]: sorted(r["step_wall_s"][1:])[len(r["step_wall_s"][1:]) // 2] for r in results
              if "step_wall_s" in r and len(r["step_wall_s"]) > 1}
    summary = {f"{row} ÷ ours (steady step)": round(s / steady["ours"], 2) for row, s in steady.items()
               if "ours" in steady}
    Path(args.out).write_text(json.dumps({"steps": args.steps, "load": os.getloadavg(), "results": results,
                                          "steady_step_s": steady, "ratios": summary}, indent=1))
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
