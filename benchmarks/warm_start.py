"""Warm starts: time to the first training step cold vs warm from the compile cache saved with the adapter.

    python -m benchmarks.warm_start                        # hidden 256, depths 2 and 8, lowering inductor
    python -m benchmarks.warm_start --layers 2 --small     # quick validation (hidden 64)
    python -m benchmarks.warm_start --lowering regional

Per depth, three fresh processes (TORCHINDUCTOR_COMPILE_THREADS=1, so every C++ compile is a reaped child
counted in the CPU time):
  cold        a new empty TORCHINDUCTOR_CACHE_DIR; ac.compile(model, ac.LoRA(...)), first step; after its
              backward m.save_adapter(dir, compile_cache=True) (its time: save_s, not counted in the
              first step; before the optimizer step, so the warm runs load the same weights)
  warm        ANOTHER new empty TORCHINDUCTOR_CACHE_DIR (nothing warm on disk); ac.compile(model, dir,
              compile_cache=True): the artifacts saved with the adapter are all it has
  warm_local  the cold run's cache dir again, ac.compile(model, dir) without loading the artifacts:
              what a rerun on the same machine gets from Inductor's local caches (the reference:
              on CPU it also has the compiled C++ kernels, which the artifacts do not carry)
Measured like benchmarks/first_step.py: first_step_s (wall) and first_step_cpu_s from the compile call
to the end of the first AdamW step (capture, compile, the guard's eager check, forward, backward);
plus Inductor/AOTAutograd cache counters, the guard's verdict ("reused": a warm start took the verdict
saved with the cache, docs/GUARANTEES.md section 7) and, for warm, the report's compile-cache line. The
warm runs' first loss must equal the cold run's (loss_matches_cold).

Breakdown (phases_s, wall and CPU s per phase: benchmarks/phases.py): cache_load, capture (torch.export),
passes (pipeline.build), guard_reference (the guard's eager run), dynamo (its trace, minus the backend),
aot_inductor (AOTAutograd + Inductor: on a warm start, cache lookups and loading the compiled code),
regional_prepare / regional_compile (lowering="regional"), compiled_run (the compiled forward and backward
of the guard's call), backward (the user's), optimizer; before_s: import and model build, outside the
first step's clock. A second table prints the CPU seconds per phase.

Model: Llama (hidden 256, intermediate 512, 4 heads, vocab 1000; --small: hidden 64), random weights, LoRA
r=8 on q/k/v/o, batch 2 x 64, OMP_NUM_THREADS=2 unless set. One JSON line per run appended to --out
(default benchmarks/warm_start.jsonl), a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks import child
from benchmarks.first_step import TARGETS, _cpu_s


def one(run: str, layers: int, small: bool, adapter_dir: str, lowering: str) -> dict:
    t_import, c_import = time.perf_counter(), _cpu_s()
    import torch
    from torch._dynamo.utils import counters

    import adapt_compiler as ac
    from benchmarks.phases import Phases

    before = {"import": (time.perf_counter() - t_import, _cpu_s() - c_import)}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    hidden, inter = (64, 128) if small else (256, 512)
    t, c = time.perf_counter(), _cpu_s()
    model, batch = child.llama_and_batch(hidden, inter, layers)
    before["model_build"] = (time.perf_counter() - t, _cpu_s() - c)

    phases = Phases()
    t0, c0 = time.perf_counter(), _cpu_s()
    with phases:
        if run == "cold":
            m = ac.compile(model, ac.LoRA(r=8, targets=TARGETS), lowering=lowering)
        else:
            m = ac.compile(model, adapter_dir, lowering=lowering, compile_cache=run == "warm")
        m.train()
        params = m.adapter_parameters()
        opt = torch.optim.AdamW(params, lr=1e-3)
        with phases.phase("first_forward"):  # what of the forward no phase below names
            loss = m(**batch).loss
        with phases.phase("backward"):
            loss.backward()
    save_s = save_cpu_s = 0.0
    if run == "cold":  # saved before the optimizer step: the warm runs start from these weights (same loss)
        t, c = time.perf_counter(), _cpu_s()
        m.save_adapter(adapter_dir, compile_cache=True)
        save_s, save_cpu_s = time.perf_counter() - t, _cpu_s() - c
    with phases.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    res = {"run": run, "layers": layers, "small": small, "lowering": lowering,
           "first_step_s": time.perf_counter() - t0 - save_s, "first_step_cpu_s": _cpu_s() - c0 - save_cpu_s,
           "loss0": float(loss), "before_s": {k: (round(w, 3), round(c, 3)) for k, (w, c) in before.items()},
           "phases_s": phases.seconds()}
    if run == "cold":
        res["save_s"] = save_s
        res["cache_bytes"] = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir)
                                 if f.startswith("compile_cache."))
    rep = m.report()
    res["cache_line"] = rep.compile_cache
    res["guard"] = [f"{what}: {getattr(v, 'status', None)}" for what, v in m._checks()]
    res["counters"] = {k: {n: v for n, v in counters[k].items() if "cache" in n}
                       for k in ("inductor", "aot_autograd")}
    return res


def run_child(run: str, layers: int, small: bool, adapter_dir: str, cache: str, lowering: str) -> dict:
    return child.run_child("benchmarks.warm_start", ["--run", run, "--layers", str(layers), "--adapter-dir",
                                                     adapter_dir, "--lowering", lowering, *(["--small"] if small else [])],
                           cache, {"run": run, "layers": layers})


PHASES = ("cache_load", "capture", "passes", "guard_reference", "dynamo", "regional_prepare", "regional_compile",
          "aot_inductor", "compiled_run", "backward", "optimizer")


def table(rows: list[dict]) -> str:
    out = ["| layers | lowering | run | first step s (wall) | first step CPU s | FX-graph cache hit/miss "
           "| AOTAutograd hit/miss | guard | loss = cold | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['layers']} | {r.get('lowering', '')} | {r['run']} | ERROR {r['error'][-160:]!r} |||||||")
            continue
        ind, aot = r["counters"]["inductor"], r["counters"]["aot_autograd"]
        guard = ", ".join(g.split(": ", 1)[-1] for g in r.get("guard", [])) or "-"
        out.append(f"| {r['layers']} | {r['lowering']} | {r['run']} | {r['first_step_s']:.1f} | {r['first_step_cpu_s']:.1f} | "
                   f"{ind.get('fxgraph_cache_hit', 0)}/{ind.get('fxgraph_cache_miss', 0)} | "
                   f"{aot.get('autograd_cache_hit', 0)}/{aot.get('autograd_cache_miss', 0)} | {guard} | "
                   f"{r.get('loss_matches_cold', '')} | {r['load1']:.1f} |")
    return "\n".join(out)


def breakdown(rows: list[dict]) -> str:
    """CPU seconds per phase (benchmarks/phases.py); import and model build happen before the first step's clock."""
    rows = [r for r in rows if "phases_s" in r]
    used = [p for p in PHASES if any(p in r["phases_s"] for r in rows)]
    out = ["| layers | lowering | run | import | model build | " + " | ".join(used) + " | other | first step CPU s |",
           "|---|---|---|---|---|" + "---|" * (len(used) + 2)]
    for r in rows:
        ph, before = r["phases_s"], r.get("before_s", {})
        cells = [f"{ph[p][1]:.2f}" if p in ph else "-" for p in used]
        other = r["first_step_cpu_s"] - sum(v[1] for v in ph.values())
        out.append(f"| {r['layers']} | {r['lowering']} | {r['run']} | {before.get('import', (0, 0))[1]:.1f} | "
                   f"{before.get('model_build', (0, 0))[1]:.1f} | " + " | ".join(cells) +
                   f" | {other:.2f} | {r['first_step_cpu_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="sweep", choices=["sweep", "one"])
    ap.add_argument("--run", choices=["cold", "warm", "warm_local"])
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--small", action="store_true", help="hidden 64: validates the script quickly")
    ap.add_argument("--lowering", default="inductor", choices=["inductor", "regional"])
    ap.add_argument("--adapter-dir")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_start.jsonl"))
    a = ap.parse_args()
    if a.cmd == "one":
        print(json.dumps(one(a.run, int(a.layers), a.small, a.adapter_dir, a.lowering)), flush=True)
        return
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        work = tempfile.mkdtemp(prefix=f"ac_warm_start_{layers}_")
        adapter_dir, cold_cache = os.path.join(work, "adapter"), os.path.join(work, "cache_cold")
        cold = None
        for run, cache in (("cold", cold_cache), ("warm", os.path.join(work, "cache_warm")),
                           ("warm_local", cold_cache)):
            res = run_child(run, layers, a.small, adapter_dir, cache, a.lowering)
            if run == "cold":
                cold = res
            elif "error" not in res and cold is not None and "error" not in cold:
                res["loss_matches_cold"] = res["loss0"] == cold["loss0"]
            rows.append(res)
            print(json.dumps(res), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    print(table(rows))
    print()
    print(breakdown(rows))


if __name__ == "__main__":
    main()
