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
and the base forward, eager and compiled; each method's row times the base and its peers in turns.
Also run: `xlora` (vs our LoRA step) and `mixed8` (8 adapters in one batch) from benchmarks/extras.py,
`infer_interleaved` from benchmarks/interleaved.py. Results: benchmarks/results.json, results.md,
ratios.png.
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


def train_step_fn(module, params, batch, extra_loss=None):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = module(**batch)
        loss = out.loss if extra_loss is None else out.loss + extra_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(module, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run():
        with torch.no_grad():
            module(**inputs)

    return run


def time_in_turns(fns: dict, steps: int, warmup: int = 3) -> dict:
    """Median ms of each callable, timed in turns (a, b, c, a, b, c, ...).

    On a shared 2-core machine speed drifts by 10-30 % over minutes; timing the peers of one row
    in turns makes the drift hit all of them alike, so their ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


class FrozenBase:
    """The standard model with no adapter, eager and compiled: training step and eval forward.

    The training step is forward + backward to the input embeddings (nothing else needs a grad)."""

    def __init__(self, model, batch):
        base = copy.deepcopy(model)
        for p in base.parameters():
            p.requires_grad_(False)
        emb = base.get_input_embeddings()
        compiled = torch.compile(base)

        def step_of(runner):
            def step():
                x = emb(batch["input_ids"]).detach().requires_grad_()
                runner(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
            return step

        self.train = {"base_eager": step_of(base), "base_compiled": step_of(compiled)}
        self.infer = {"base_eager": infer_fn(base, batch), "base_compiled": infer_fn(compiled, batch)}
        self.saved_bytes = saved_bytes(self.train["base_eager"])

    @staticmethod
    def summary(train: dict, infer: dict) -> dict:
        return {"train_ms": train["base_eager"], "train_compiled_ms": train["base_compiled"],
                "infer_ms": infer["base_eager"], "infer_compiled_ms": infer["base_compiled"]}

    def measure(self, steps) -> dict:
        out = self.summary(time_in_turns(self.train, steps), time_in_turns(self.infer, steps))
        out["saved_bytes"] = self.saved_bytes
        return out


def describe(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err)[:200]}"


def _runnable(fns: dict, errors: dict) -> dict:
    """The callables that run once (this also compiles them); a failing peer is reported, not fatal."""
    ok = {}
    for k, fn in fns.items():
        try:
            fn()
            ok[k] = fn
        except Exception as err:  # noqa: BLE001
            errors[k] = describe(err)
    return ok


def bench_row(model, spec, peft_cfg, batch, steps, base: FrozenBase, peft_compile: bool = True) -> dict:
    """One method: the frozen base (eager, compiled), ours, PEFT eager and PEFT + torch.compile,
    timed in turns for the training step, the unmerged forward and the merged forward."""
    import peft

    import adapt_compiler as ac

    errors: dict = {}
    runners, params, extra_loss = {}, {}, {}
    try:
        ours_spec = spec()
        m = ac.compile(model, ours_spec).train()
        runners["ours"], params["ours"] = m, m.adapter_parameters()
        if ours_spec.method == "adalora":
            # PEFT's AdaLoRA forward adds its orthogonality regulariser to the loss; ours leaves that
            # to the user (m.regularization_loss()), so the same training step is timed with it added
            extra_loss["ours"] = m.regularization_loss
    except Exception as err:  # noqa: BLE001
        m, errors["ours"] = None, describe(err)
    try:
        pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg()).train()
        runners["peft_eager"] = pm
        params["peft_eager"] = params["peft_compile"] = [p for p in pm.parameters() if p.requires_grad]
        if peft_compile:
            runners["peft_compile"] = torch.compile(pm)
    except Exception as err:  # noqa: BLE001
        pm, errors["peft"] = None, describe(err)
    for k in ("ours", "peft_eager"):
        if k in params:
            randomize(params[k])
    peers = {k: {} for k in runners}

    train_fns = _runnable({k: train_step_fn(r, params[k], batch, extra_loss.get(k)) for k, r in runners.items()},
                          errors)
    train = time_in_turns({**base.train, **train_fns}, steps)
    for k, fn in train_fns.items():
        peers[k]["train_ms"], peers[k]["saved_bytes"] = train[k], saved_bytes(fn)

    for r in (m, pm):
        if r is not None:
            r.eval()
    infer_fns = _runnable({k: infer_fn(r, batch) for k, r in runners.items()}, errors)
    infer = time_in_turns({**base.infer, **infer_fns}, steps)
    for k in infer_fns:
        peers[k]["infer_ms"] = infer[k]

    merged_fns = {}
    if m is not None:
        try:
            m.merge()
            merged_fns["ours"] = infer_fn(m, batch)
        except ac.AdapterError as err:
            errors["ours_merge"] = str(err)[:200]
        peers["ours"]["orders"] = sorted({r.order for r in m.report().rows})
    if pm is not None:
        try:
            merged = pm.merge_and_unload()
            merged_fns["peft_eager"] = infer_fn(merged, batch)
            if peft_compile:
                merged_fns["peft_compile"] = infer_fn(torch.compile(merged), batch)
        except Exception as err:  # noqa: BLE001 - methods without a merge
            errors["peft_merge"] = describe(err)
    merged_fns = _runnable(merged_fns, errors)
    merged_t = time_in_turns({**base.infer, **merged_fns}, steps)
    for k in merged_fns:
        peers[k]["merged_ms"] = merged_t[k]
    row = {"base": FrozenBase.summary(train, infer), **peers}
    row["base"]["infer_for_merged_ms"] = merged_t["base_eager"]
    row["base"]["infer_compiled_for_merged_ms"] = merged_t["base_compiled"]
    if errors:
        row["errors"] = errors
    return row


def time_train_and_infer(module, runner, params, batch, steps) -> dict:
    """Training step (with its saved-for-backward bytes), then the eval forward, of `runner`
    (`module` itself or a torch.compile of it)."""
    module.train()
    step = train_step_fn(runner, params, batch)
    res = {"train_ms": timeit(step, steps), "saved_bytes": saved_bytes(step)}
    module.eval()
    res["infer_ms"] = timeit(infer_fn(runner, batch), steps)
    return res


def bench_peft(model, peft_cfg, batch, steps, compiled: bool) -> dict:
    """A PEFT model on its own (no merge): used for methods with no weight form (X-LoRA)."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg())
    params = [p for p in pm.parameters() if p.requires_grad]
    randomize(params)
    return time_train_and_infer(pm, torch.compile(pm) if compiled else pm, params, batch, steps)


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
    # Each row compiles the same HF forward for several model objects and grad modes (base, PEFT,
    # merged): past Dynamo's default 8 recompiles of one frame, later peers would silently run eager
    torch._dynamo.config.recompile_limit = 64

    model, batch = standard_model(), standard_batch()
    table = configs()
    wanted = args.methods.split(",") if args.methods else [*table, *EXTRAS]
    unknown = [n for n in wanted if n not in table and n not in EXTRAS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {[*sorted(table), *EXTRAS]}")
    results = {"config": {"hidden": 512, "layers": 4, "batch": "4x128", "threads": args.threads,
                          "torch": torch.__version__}}
    print("frozen base ...", flush=True)
    frozen = FrozenBase(model, batch)
    results["base"] = base = frozen.measure(args.steps)
    print(f"  base: train {base['train_ms']:.1f} ms, infer {base['infer_ms']:.1f} ms", flush=True)

    def run_peer(name, label, fn):
        if label == "peft_compile" and args.no_peft_compile:
            return {"error": "skipped (--no-peft-compile)"}
        print(f"{name}: {label} ...", flush=True)
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a failing peer is reported, not fatal
            return {"error": describe(err)}
        finally:
            torch._dynamo.reset()
            gc.collect()

    extra_runs = {
        "xlora": lambda peer: bench_xlora(model, batch, args.steps, peer),
        "mixed8": lambda peer: bench_mixed(model, args.steps, peer),
        "infer_interleaved": lambda peer: peer("ours", lambda: bench_interleaved_inference(model, batch)),
    }
    for name in wanted:
        if name in extra_runs:
            results[name] = extra_runs[name](lambda label, fn, name=name: run_peer(name, label, fn))
            print(f"  {name}: {json.dumps(results[name], default=str)}", flush=True)
            continue
        spec, peft_cfg = table[name]
        print(f"{name}: base, ours, PEFT eager{'' if args.no_peft_compile else ', PEFT compile'} in turns ...",
              flush=True)
        results[name] = row = bench_row(model, spec, peft_cfg, batch, args.steps, frozen,
                                        peft_compile=not args.no_peft_compile)
        torch._dynamo.reset()
        gc.collect()
        print("  " + summary_line(name, row, row["base"]), flush=True)
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
    lines = [
        f"Frozen base: train step {base['train_ms']:.1f} ms eager, {_ms(base.get('train_compiled_ms'))} compiled; "
        f"forward {base['infer_ms']:.1f} ms eager, {base['infer_compiled_ms']:.1f} ms compiled "
        f"({results['config']['threads']} threads, torch {results['config']['torch']}).",
        "",
        "| method | train ÷ eager base: ours | PEFT eager | PEFT compile | ours ÷ compiled base "
        "| ours ÷ PEFT compile | unmerged fwd ÷ compiled base: ours | PEFT eager ÷ eager base "
        "| merged fwd ÷ compiled base: ours | saved-for-backward: ours ÷ PEFT | order |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, row in results.items():
        if name in ("config", "base", *EXTRAS) or not isinstance(row, dict):
            continue
        b = row.get("base", base)  # the base timed in turns with this row's peers
        o, pe, pc = row.get("ours", {}), row.get("peft_eager", {}), row.get("peft_compile", {})
        lines.append(
            f"| {name} | {_fmt(_ratio(o.get('train_ms'), b['train_ms']))} "
            f"| {_fmt(_ratio(pe.get('train_ms'), b['train_ms']))} "
            f"| {_fmt(_ratio(pc.get('train_ms'), b['train_ms']))} "
            f"| {_fmt(_ratio(o.get('train_ms'), b.get('train_compiled_ms')))} "
            f"| {_fmt(_ratio(o.get('train_ms'), pc.get('train_ms')))} "
            f"| {_fmt(_ratio(o.get('infer_ms'), b['infer_compiled_ms']))} "
            f"| {_fmt(_ratio(pe.get('infer_ms'), b['infer_ms']))} "
            f"| {_fmt(_ratio(o.get('merged_ms'), b.get('infer_compiled_for_merged_ms', b['infer_compiled_ms'])))} "
            f"| {_fmt(_ratio(o.get('saved_bytes'), pe.get('saved_bytes')))} | {','.join(o.get('orders', []))} |"
        )
        for who, err in row.get("errors", {}).items():
            notes.append(f"- {name}, {who}: `{err}`")
    lines.append("")
    lines.append("Ours runs through Inductor (`ac.compile`'s default), so its fair baseline is the compiled "
                 "frozen base; PEFT eager is compared with the eager base. Each row times its peers and the "
                 "base in turns (medians), so machine drift hits them alike. – : not measured (no merge, or "
                 "the peer failed).")
    if notes:
        lines += ["", "Not measured:", *notes]
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
