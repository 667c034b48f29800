"""lowering="auto" vs "inductor" vs "eager": wall time to the first step and to step N of one training run.

    python -m benchmarks.auto_switch                       # tiny and small Llama, 300 steps each, 3 lowerings
    python -m benchmarks.auto_switch --steps 3000 --max-s 300   # long enough for "auto" to switch
    python -m benchmarks.auto_switch --models tiny --steps 30   # quick validation

Every run is a fresh process with its own new TORCHINDUCTOR_CACHE_DIR (cold) and
TORCHINDUCTOR_COMPILE_THREADS=1. Model: Llama from LlamaConfig with random weights, "tiny" (hidden 64,
intermediate 128, 2 layers) or "small" (hidden 256, intermediate 512, 4 layers), 4 heads, vocab 1000;
LoRA r=8 on q/k/v/o; batch 2 x 64; AdamW on the adapter tensors. The clock starts at ac.compile (model
construction not counted) and is read after every optimizer step, so a run gives its time to any step
(`at_s[n-1]`: wall seconds to the end of step n). For "auto" also: the step that first ran the compiled
graph and how long the background compile took (EagerUntilCompiled, report()). A markdown table is
printed; JSON lines are appended to --out.

On a machine shared with other jobs the numbers are noisy: compare lowerings within one invocation
(they run back to back) and rerun on a quiet machine before quoting.

"auto" runs with ADAPT_COMPILER_AUTO_UNSAFE=1: on torch 2.13 ac.compile refuses it (FX tracing in the
background compile patches nn.Module.__call__ for the training thread too), and a run can fail with
"NameError: module is not installed as a submodule"; the table shows such a run as ERROR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks import child

LOWERINGS = ("eager", "inductor", "auto")
MODELS = {"tiny": (64, 128, 2), "small": (256, 512, 4)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MARKS = (1, 20, 100, 300, 1000, 3000)


def one(lowering: str, model_name: str, steps: int, max_s: float) -> dict:
    import torch

    import adapt_compiler as ac

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hidden, inter, layers = MODELS[model_name]
    model, batch = child.llama_and_batch(hidden, inter, layers)

    t0 = time.perf_counter()
    m = ac.compile(model, ac.LoRA(r=8, targets=TARGETS), lowering=lowering).train()
    opt = torch.optim.AdamW(m.adapter_parameters(), lr=1e-3)
    at, losses = [], []
    for _ in range(steps):
        if at and at[-1] > max_s:  # a wall-clock cap: the run stops early (its later marks stay empty)
            break
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        at.append(time.perf_counter() - t0)
        losses.append(float(loss))
    res = {"lowering": lowering, "model": model_name, "steps": len(at), "at_s": at, "loss_last": losses[-1]}
    gaps = [b - a for a, b in zip(at, at[1:])]
    if gaps:
        res["last20_ms"] = 1000 * statistics.median(gaps[-20:])
    programs = [gm.meta["ac_auto"] for es in m._graphs.values() for e in es for gm in e.graphs.values()
                if "ac_auto" in gm.meta]
    if programs:
        p = programs[0]
        res.update(switched_at=p.switched_at, compile_s=p.compile_s, auto_status=p.status,
                   eager_ms=1000 * statistics.median(gaps[1:max(2, (p.switched_at or steps) - 1)]) if len(gaps) > 1
                   else None)
    return res


def run_child(lowering: str, model_name: str, steps: int, max_s: float) -> dict:
    cache = tempfile.mkdtemp(prefix="ac_auto_cache_")
    return child.run_child("benchmarks.auto_switch", ["--lowering", lowering, "--models", model_name, "--steps",
                                                      str(steps), "--max-s", str(max_s)],
                           cache, {"lowering": lowering, "model": model_name}, threads="1",
                           ADAPT_COMPILER_AUTO_UNSAFE="1")  # measure "auto" where ac.compile refuses it (auto.py)


def table(rows: list[dict]) -> str:
    marks = [n for n in MARKS if any(len(r.get("at_s", ())) >= n for r in rows)]
    head = " | ".join(f"to step {n} s" for n in marks)
    out = [f"| model | lowering | {head} | switched at step (s) | compile s | eager step ms | last-20 step ms | load |",
           "|---|---|" + "---|" * (len(marks) + 5)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['lowering']} | ERROR {r['error'][-200:]!r} |")
            continue
        cells = [f"{r['at_s'][n - 1]:.1f}" if len(r["at_s"]) >= n else "" for n in marks]
        sw, auto = r.get("switched_at"), r["lowering"] == "auto"
        switched = "-" if not auto else (f"{sw} ({r['at_s'][sw - 1]:.1f})" if sw else f"not within {len(r['at_s'])}")
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        eager = f"{r['eager_ms']:.1f}" if r.get("eager_ms") else "-"
        out.append(f"| {r['model']} | {r['lowering']} | {' | '.join(cells)} | {switched} | {compile_s} | {eager} | "
                   f"{r.get('last20_ms', float('nan')):.1f} | {r['load1']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="sweep", choices=["sweep", "one"])
    ap.add_argument("--lowering", choices=LOWERINGS)
    ap.add_argument("--lowerings", default=",".join(LOWERINGS))
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-s", type=float, default=600.0, help="stop a run after this many wall seconds")
    ap.add_argument("--out", default="benchmarks/results_auto.jsonl")
    a = ap.parse_args()
    if a.cmd == "one":
        print(json.dumps(one(a.lowering, a.models, a.steps, a.max_s)), flush=True)
        return
    rows = []
    for model_name in a.models.split(","):
        for lowering in a.lowerings.split(","):
            r = run_child(lowering, model_name, a.steps, a.max_s)
            rows.append(r)
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(table([r]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
