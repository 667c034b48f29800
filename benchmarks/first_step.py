"""Time to first training step: ours whole-graph vs ours regional vs PEFT (+ torch.compile), by depth.

    python -m benchmarks.first_step                            # depths 2,8,24; every variant; cold runs
    python -m benchmarks.first_step --layers 2 --small --steady 2   # quick validation (tiny model)
    python -m benchmarks.first_step --warm                     # also a warm run (same Inductor cache dir)

Every measurement is a fresh process (`python -m benchmarks.first_step one ...`) with its own new
TORCHINDUCTOR_CACHE_DIR (cold; the cache is enabled, just empty) and TORCHINDUCTOR_COMPILE_THREADS=1,
so every C++ compile is a reaped child and counted in the CPU time. A warm run reuses the cold run's
cache dir in another fresh process.

Model: Llama from LlamaConfig (hidden 256, intermediate 512, 4 heads, vocab 1000; --small: hidden 64,
intermediate 128), random weights; LoRA r=8 on q/k/v/o; batch 2 x 64; AdamW on the adapter tensors;
OMP_NUM_THREADS=2. Measured:
  first_step_s      wall time from the adapter/compile call (ours: ac.compile; PEFT: get_peft_model
                    [+ torch.compile]) to the end of the first optimizer step (capture, compile, the
                    guard's eager check, forward, backward, AdamW); model construction not counted
  first_step_cpu_s  CPU time (user+sys, this process and reaped children) over the same span: on a
                    shared machine the steadier number
  steady_ms         median train step afterwards (steady_cpu_ms: its CPU time, all threads)
  compiles          ours regional: AOT compiles (COUNTERS["regional_compiles"]); else Dynamo graphs
Variants: inductor (ours, lowering="inductor": the whole graph), regional (ours,
lowering="regional"), peft_compile (PEFT + torch.compile), peft_eager.
Results: one JSON line per run appended to --out (default benchmarks/first_step.jsonl); a markdown
table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

from benchmarks import child

VARIANTS = ("inductor", "regional", "peft_compile", "peft_eager")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _cpu_s() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def one(variant: str, layers: int, steady: int, small: bool) -> dict:
    """One measurement in this process (see the module docstring)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    hidden, inter = (64, 128) if small else (256, 512)
    model, batch = child.llama_and_batch(hidden, inter, layers)

    t0, c0 = time.perf_counter(), _cpu_s()
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        module = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        fn = torch.compile(module) if variant == "peft_compile" else module
    else:
        import adapt_compiler as ac
        from adapt_compiler.counters import COUNTERS

        module = ac.compile(model, ac.LoRA(r=8, targets=TARGETS), lowering=variant)
        module.train()
        params = module.adapter_parameters()
        fn = module
    opt = torch.optim.AdamW(params, lr=1e-3)

    def train_step():
        loss = fn(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    loss = train_step()
    res = {"variant": variant, "layers": layers, "small": small, "first_step_s": time.perf_counter() - t0,
           "first_step_cpu_s": _cpu_s() - c0, "loss0": loss}
    times, cpu = [], []
    for i in range(steady + 2):
        t, c = time.perf_counter(), time.process_time()
        train_step()
        if i >= 2:  # the first steps after the first may still build (optimizer state, lazy backward)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    if times:
        res["steady_ms"] = 1000 * statistics.median(times)
        res["steady_cpu_ms"] = 1000 * statistics.median(cpu)  # all threads: steadier on a shared machine
    from torch._dynamo.utils import counters

    res["compiles"] = (COUNTERS["regional_compiles"] if variant == "regional"
                       else counters["stats"]["unique_graphs"])
    return res


def run_child(variant: str, layers: int, cache: str, steady: int, small: bool) -> dict:
    return child.run_child("benchmarks.first_step", ["--variant", variant, "--layers", str(layers), "--steady",
                                                     str(steady), *(["--small"] if small else [])],
                           cache, {"variant": variant, "layers": layers})


def table(rows: list[dict]) -> str:
    out = ["| variant | layers | run | first step s (wall) | first step CPU s | steady ms | steady CPU ms | compiles "
           "| load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['layers']} | {r.get('run', '')} | ERROR {r['error'][-160:]!r} |||||")
            continue
        out.append(f"| {r['variant']} | {r['layers']} | {r['run']} | {r['first_step_s']:.1f} | "
                   f"{r['first_step_cpu_s']:.1f} | {r.get('steady_ms', float('nan')):.1f} | "
                   f"{r.get('steady_cpu_ms', float('nan')):.1f} | {r['compiles']} | "
                   f"{r['load1']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="sweep", choices=["sweep", "one"])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", default="2,8,24")
    ap.add_argument("--steady", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="hidden 64: validates the script quickly")
    ap.add_argument("--warm", action="store_true", help="also a warm run per compiled variant (same cache dir)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "first_step.jsonl"))
    a = ap.parse_args()
    if a.cmd == "one":
        print(json.dumps(one(a.variant, int(a.layers), a.steady, a.small)), flush=True)
        return
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        for variant in a.variants.split(","):
            cache = tempfile.mkdtemp(prefix=f"ac_first_step_{variant}_{layers}_")
            runs = ["cold", "warm"] if a.warm and variant != "peft_eager" else ["cold"]
            for run in runs:
                res = run_child(variant, layers, cache, a.steady if run == "cold" else 0, a.small)
                res["run"] = run
                rows.append(res)
                print(json.dumps(res), flush=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
