"""Side-by-side benchmark: frozen base, PEFT eager, PEFT + torch.compile, adapt_compiler — in one run.

    python -m benchmarks.run                    # every registered method, standard config
    python -m benchmarks.run --methods lora,dora --steps 10

Standard config: Llama from config, hidden 512, intermediate 1024, 4 layers, 8 heads, vocab 2000,
batch 4 × 128 tokens, float32, 2 threads. Measured per method:
  train   forward + backward + AdamW step on the adapter params (median ms)
  infer   eval forward under no_grad, unmerged (median ms)
  merged  eval forward with the adapter folded into the weights (ours: merge(); PEFT: merge_and_unload)
  saved   bytes saved for backward in one training step (activation memory, via saved_tensors_hooks)
Ratios are against the frozen-base step (no adapter; forward + backward to the input embeddings)
and the base eager forward. Also run (benchmarks/extras.py): `xlora` (vs our LoRA step) and `mixed8`
(8 adapters in one batch). Results: benchmarks/results.json, results.md, ratios.png.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def standard_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=2000, max_position_embeddings=512, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


EXTRAS = ("xlora", "mixed8", "infer_interleaved")  # rows that are not "one adapter vs the frozen base"


def standard_batch(batch=4, seq=128, vocab=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def timeit(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def randomize(params, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def train_step_fn(module, params, batch):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = module(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(module, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run():
        with torch.no_grad():
            module(**inputs)

    return run


def frozen_base(model, batch, steps):
    base = copy.deepcopy(model)
    for p in base.parameters():
        p.requires_grad_(False)
    emb = base.get_input_embeddings()

    def step():
        x = emb(batch["input_ids"]).detach().requires_grad_()
        base(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    compiled = torch.compile(base)

    def step_c():  # the fair baseline for compiled peers (ours, PEFT + torch.compile)
        x = emb(batch["input_ids"]).detach().requires_grad_()
        compiled(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    def infer_c():
        with torch.no_grad():
            compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return {
        "train_ms": timeit(step, steps),
        "infer_ms": timeit(infer_fn(base, batch), steps),
        "infer_compiled_ms": timeit(infer_c, steps),
        "train_compiled_ms": timeit(step_c, steps),
        "saved_bytes": saved_bytes(step),
    }


def bench_peft(model, peft_cfg, batch, steps, compiled: bool, merge: bool = True):
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg()).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    randomize(params)
    runner = torch.compile(pm) if compiled else pm
    step = train_step_fn(runner, params, batch)
    res = {"train_ms": timeit(step, steps), "saved_bytes": saved_bytes(step)}
    pm.eval()
    res["infer_ms"] = timeit(infer_fn(runner, batch), steps)
    if not merge:  # X-LoRA: no weight form
        return res
    try:
        merged = pm.merge_and_unload()
        merged_runner = torch.compile(merged) if compiled else merged
        res["merged_ms"] = timeit(infer_fn(merged_runner, batch), steps)
    except Exception as err:  # noqa: BLE001 - methods without a merge
        res["merged_ms"] = None
        res["merge_error"] = type(err).__name__
    return res


def bench_ours(model, spec, batch, steps):
    import adapt_compiler as ac

    m = ac.compile(model, spec()).train()
    params = m.adapter_parameters()
    randomize(params)
    step = train_step_fn(m, params, batch)
    res = {"train_ms": timeit(step, steps), "saved_bytes": saved_bytes(step)}
    m.eval()
    res["infer_ms"] = timeit(infer_fn(m, batch), steps)
    try:
        m.merge()
        res["merged_ms"] = timeit(infer_fn(m, batch), steps)
        m.unmerge()
    except ac.AdapterError:
        res["merged_ms"] = None
    res["orders"] = sorted({r.order for r in m.report().rows})
    return res


def main(argv=None):
    from .extras import bench_mixed, bench_xlora, extras_table
    from .interleaved import bench_interleaved_inference, interleaved_table
    from .methods import configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all registered)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peft-compile", action="store_true")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, batch = standard_model(), standard_batch()
    table = configs()
    extras = list(EXTRAS)
    wanted = args.methods.split(",") if args.methods else list(table) + extras
    unknown = [n for n in wanted if n not in table and n not in extras]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(table) + extras}")
    results = {"config": {"hidden": 512, "layers": 4, "batch": "4x128", "threads": args.threads,
                          "torch": torch.__version__}}
    print("frozen base ...", flush=True)
    results["base"] = base = frozen_base(model, batch, args.steps)
    print(f"  base: train {base['train_ms']:.1f} ms, infer {base['infer_ms']:.1f} ms", flush=True)

    def run_peer(name, label, fn):
        if label == "peft_compile" and args.no_peft_compile:
            return {"error": "skipped (--no-peft-compile)"}
        print(f"{name}: {label} ...", flush=True)
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a failing peer is reported, not fatal
            return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        finally:
            torch._dynamo.reset()
            gc.collect()

    for name in wanted:
        if name == "xlora":
            results[name] = bench_xlora(model, batch, args.steps, lambda label, fn: run_peer(name, label, fn))
            print(f"  {name}: {json.dumps(results[name], default=str)}", flush=True)
            continue
        if name == "infer_interleaved":
            results[name] = run_peer(name, "ours", lambda: bench_interleaved_inference(model, batch))
            print(f"  {name}: {json.dumps(results[name], default=str)}", flush=True)
            continue
        if name == "mixed8":
            results[name] = bench_mixed(model, args.steps, lambda label, fn: run_peer(name, label, fn))
            print(f"  {name}: {json.dumps(results[name], default=str)}", flush=True)
            continue
        spec, peft_cfg = table[name]
        results[name] = row = {
            "ours": run_peer(name, "ours", lambda: bench_ours(model, spec, batch, args.steps)),
            "peft_eager": run_peer(name, "peft_eager", lambda: bench_peft(model, peft_cfg, batch, args.steps, False)),
            "peft_compile": run_peer(name, "peft_compile", lambda: bench_peft(model, peft_cfg, batch, args.steps, True)),
        }
        print("  " + summary_line(name, row, base), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown_table(results) + "\n" + extras_table(results) + "\n" + interleaved_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(report)
    plot(results, out / "ratios.png")
    print(report)


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summary_line(name, row, base):
    ours = row.get("ours", {})
    parts = [f"{name}:"]
    for label in ("ours", "peft_eager", "peft_compile"):
        r = row.get(label, {})
        if "train_ms" in r:
            parts.append(f"{label} train {r['train_ms'] / base['train_ms']:.2f}x")
    if "infer_ms" in ours:
        parts.append(f"ours infer {ours['infer_ms'] / base['infer_ms']:.2f}x")
    return " ".join(parts)


def _fmt(x):
    return "–" if x is None else f"{x:.2f}×"


def markdown_table(results) -> str:
    base = results["base"]
    tc, ic = base.get("train_compiled_ms"), base["infer_compiled_ms"]
    lines = [
        f"Frozen base: train step {base['train_ms']:.1f} ms eager, {_ms(tc)} compiled; forward "
        f"{base['infer_ms']:.1f} ms eager, {ic:.1f} ms compiled "
        f"({results['config']['threads']} threads, torch {results['config']['torch']}).",
        "",
        "| method | train ÷ eager base: ours | PEFT eager | PEFT compile | ours ÷ compiled base "
        "| ours ÷ PEFT compile | unmerged fwd ÷ compiled base: ours | PEFT eager ÷ eager base "
        "| merged fwd ÷ compiled base: ours | saved-for-backward: ours ÷ PEFT | order |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        if name in ("config", "base", *EXTRAS) or not isinstance(row, dict):
            continue
        o, pe, pc = row.get("ours", {}), row.get("peft_eager", {}), row.get("peft_compile", {})
        lines.append(
            f"| {name} | {_fmt(_ratio(o.get('train_ms'), base['train_ms']))} "
            f"| {_fmt(_ratio(pe.get('train_ms'), base['train_ms']))} "
            f"| {_fmt(_ratio(pc.get('train_ms'), base['train_ms']))} "
            f"| {_fmt(_ratio(o.get('train_ms'), tc))} "
            f"| {_fmt(_ratio(o.get('train_ms'), pc.get('train_ms')))} "
            f"| {_fmt(_ratio(o.get('infer_ms'), ic))} "
            f"| {_fmt(_ratio(pe.get('infer_ms'), base['infer_ms']))} "
            f"| {_fmt(_ratio(o.get('merged_ms'), ic))} "
            f"| {_fmt(_ratio(o.get('saved_bytes'), pe.get('saved_bytes')))} | {','.join(o.get('orders', []))} |"
        )
    lines.append("")
    lines.append("Ours runs through Inductor (`ac.compile`'s default), so its fair baseline is the compiled "
                 "frozen base; PEFT eager is compared with the eager base. Medians of the timed steps.")
    return "\n".join(lines) + "\n"


def _ms(v):
    return "n/a" if v is None else f"{v:.1f} ms"


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n in results if n not in ("config", "base", *EXTRAS)]
    bars = [("train step ÷ PEFT eager", "train_ms", "peft_eager"),
            ("train step ÷ PEFT + torch.compile", "train_ms", "peft_compile"),
            ("unmerged forward ÷ PEFT eager", "infer_ms", "peft_eager")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.6))
    width = 0.27
    for i, (label, key, peer) in enumerate(bars):
        vals = [_ratio(results[n].get("ours", {}).get(key), results[n].get(peer, {}).get(key)) for n in names]
        vals = [float("nan") if v is None else v for v in vals]
        ax.bar([j + (i - 1) * width for j in range(len(names))], vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("adapt_compiler ÷ PEFT")
    ax.set_title("adapt_compiler time relative to PEFT (below 1: faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
