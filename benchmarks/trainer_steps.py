"""Wall time of a transformers.Trainer run: ours vs PEFT eager vs PEFT + TrainingArguments(torch_compile=True).

    python -m benchmarks.trainer_steps                   # 50 steps on the standard config (benchmarks/run.py)
    python -m benchmarks.trainer_steps --steps 5 --small # a quick check of the script

Every variant runs in a fresh process (`--variant NAME` runs one and prints a JSON line). Measured:

  train_s     from the `Trainer.train()` call to its return (what a user waits for)
  first_s     the first optimizer step (capture / compile / the correctness guard happen here)
  step_ms     median of the remaining steps
  compile_s   first_s - step_ms: the one-off cost, shown apart from the steady state
  final_loss  the last logged training loss (all variants start from the same weights and data)

Standard config: Llama from config, hidden 512, intermediate 1024, 4 layers, 8 heads, vocab 2000, batch
4 x 128 tokens, float32; LoRA r=16 on q/k/v/o, AdamW lr 1e-4, default TrainingArguments otherwise
(use_cpu, no logging integrations, no saving).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
VARIANTS = ["ours", "peft", "peft_compile"]


def _model(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (64, 2) if small else (512, 4)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=2000, max_position_embeddings=512,
                      use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def _dataset(rows: int, seq: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (rows, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq] * rows, "labels": ids})


def run_variant(variant: str, steps: int, small: bool) -> dict:
    import transformers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    batch, seq = (2, 32) if small else (4, 128)
    model = _model(small)
    if variant.startswith("peft"):
        import peft

        module = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN))
    else:
        import adapt_compiler as ac

        module = ac.compile(model, ac.LoRA(r=16, alpha=32, targets=ATTN))
    stamps: list[float] = []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, max_steps=steps,
            per_device_train_batch_size=batch, learning_rate=1e-4, save_strategy="no", logging_steps=1,
            torch_compile=variant == "peft_compile")
        trainer = transformers.Trainer(model=module, args=args, train_dataset=_dataset(batch * steps, seq),
                                       callbacks=[Stamp()])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    steady = [b - a for a, b in zip(stamps, stamps[1:])]
    step_s = statistics.median(steady) if steady else float("nan")
    first_s = stamps[0] - t0  # includes Trainer's own setup before step 1 (dataloader, optimizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"variant": variant, "steps": steps, "train_s": round(train_s, 2), "first_s": round(first_s, 2),
            "step_ms": round(1000 * step_s, 1), "compile_s": round(first_s - step_s, 2),
            "final_loss": round(losses[-1], 4) if losses else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="run one variant in this process and print its JSON line")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.small)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.trainer_steps", "--variant", variant, "--steps", str(args.steps)]
        done = subprocess.run(cmd + (["--small"] if args.small else []), capture_output=True, text=True)
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{")), None)
        if done.returncode or line is None:
            rows.append({"variant": variant, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
        else:
            rows.append(json.loads(line))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | Trainer.train() (s) | first step (s) | of which one-off (s) | step (ms) | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | | | |")
        else:
            print(f"| {r['variant']} | {r['train_s']} | {r['first_s']} | {r['compile_s']} | {r['step_ms']} | "
                  f"{r['final_loss']} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
