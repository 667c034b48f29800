"""Peak RSS and step time of a QLoRA training step: ours and PEFT, 4-bit (nf4) against bf16.

    python -m benchmarks.qlora_memory                       # the 1B Llama shape, every mode, both allocators
    python -m benchmarks.qlora_memory --layers 2 --steps 2  # a quick check of the harness
    python -m benchmarks.qlora_memory --profile             # + where the step time goes (torch.profiler)
    python -m benchmarks.qlora_memory --breakdown           # CPU s/step: dequantize vs GEMM vs adapter, op by op

Model: a Llama-shaped config (hidden 2048, intermediate 5632, 16 layers, 32 heads, vocab 32000,
untied lm_head: ~1B parameters) with random weights, built on the meta device and materialised one
module at a time, each quantized Linear straight from a fresh bf16 weight (bitsandbytes Linear4bit,
nf4, double quant, bf16 compute, block 64: what BitsAndBytesConfig(load_in_4bit=True, ...,
bnb_4bit_compute_dtype=bfloat16) loads), so no bf16 copy of a quantized model ever exists. Training
step: LoRA r=8, alpha=16 on q/k/v/o (float32 adapters, as PEFT's default autocast makes them),
AdamW, batch 1 x 128 tokens with labels. Modes:

    ours-bf16 / ours-nf4     ac.compile(model, ac.LoRA(...), lowering=<--lowering>)
    peft-bf16 / peft-nf4     peft.get_peft_model(model, LoraConfig(...)) (QLoRA: peft-nf4)

Each (mode, allocator) runs in a fresh process (peak RSS is per process). Peak = the largest RSS
sampled every 10 ms during the steps, and ru_maxrss (construction included). Allocators: glibc's
default, and MALLOC_MMAP_THRESHOLD_=65536, which makes glibc return the transient dequantized
weights (8-22 MB each, freed within a layer) to the OS instead of keeping them in a heap that never
shrinks. Results: benchmarks/results_qlora.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
MODES = ("ours-bf16", "ours-nf4", "peft-bf16", "peft-nf4")
ALLOCATORS = {"glibc default": None, "MALLOC_MMAP_THRESHOLD_=65536": "65536"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# -- the child: one mode, one process ----------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler:
    def __init__(self):
        self.peak, self._stop = 0.0, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def build_model(args, quant: str):
    """The Llama-shaped model, materialised module by module; q/k/v/o/MLP quantized when quant='nf4'."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    bf16 = torch.bfloat16
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=2048, use_cache=False, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)

    def linear(old: nn.Linear) -> nn.Module:
        w = torch.empty(old.out_features, old.in_features, dtype=bf16).normal_(0, 0.02, generator=gen)
        if quant == "bf16":
            new = nn.Linear(old.in_features, old.out_features, bias=False, device="meta", dtype=bf16)
            new.weight = nn.Parameter(w, requires_grad=False)
            return new
        import bitsandbytes as bnb

        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=bf16,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       blocksize=64, module=new).to("cpu")
        new.quant_state = new.weight.quant_state
        return new

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(bf16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(parent, name, linear(child))
    for mod in model.modules():  # what is left on meta: embeddings, norms, lm_head
        if any(t.is_meta for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]):
            mod.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                if isinstance(mod, (nn.Embedding, nn.Linear)):
                    mod.weight.normal_(0, 0.02, generator=gen)
                elif getattr(mod, "weight", None) is not None:
                    mod.weight.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = quant == "nf4"  # what transformers sets; PEFT dispatches its Linear4bit on it
    return model.train()


def _classify(events, r: int) -> dict:
    """Self CPU seconds of a profiled step by where they go (see the module docstring)."""
    out = {"dequantize": 0.0, "adapter GEMMs (a rank-r operand)": 0.0, "other GEMMs (base layers, attention, "
           "lm_head)": 0.0, "everything else": 0.0}
    gemms = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_attention_math", "aten::baddbmm")
    for e in events:
        t = e.self_cpu_time_total / 1e6
        if "dequantize" in e.key:
            out["dequantize"] += t
        elif e.key in gemms:
            shapes = [tuple(s) for s in (e.input_shapes or []) if s]
            if any(r in s for s in shapes):
                out["adapter GEMMs (a rank-r operand)"] += t
            else:
                out["other GEMMs (base layers, attention, lm_head)"] += t
        else:
            out["everything else"] += t
    return {k: round(v, 3) for k, v in out.items()}


def child(args) -> dict:
    rss_start = _rss_mb()
    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401 - imported in every mode, so the import baseline is the same
    import transformers  # noqa: F401

    import adapt_compiler as ac

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    rss_imports = _rss_mb()
    who, quant = args.child.split("-")
    t0 = time.time()
    model = build_model(args, quant)
    build_s = time.time() - t0
    _malloc_trim()
    rss_built = _rss_mb()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    if who == "peft":
        net = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS))
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        net = ac.compile(model, ac.LoRA(r=args.r, alpha=2 * args.r, targets=TARGETS), lowering=args.lowering)
        for p in net.adapter_parameters():  # float32 adapters, like PEFT's default (autocast_adapter_dtype)
            p.data = p.data.float()
        net.train()
        params = net.adapter_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    _malloc_trim()
    rss_ready = _rss_mb()
    wall, cpu = [], []
    with _PeakSampler() as sampler:
        for _ in range(args.steps):
            t, c = time.perf_counter(), time.process_time()
            loss = step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    result = dict(mode=args.child, malloc=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
                  layers=args.layers, hidden=args.hidden, seq=args.seq, lowering=args.lowering if who == "ours" else "",
                  params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                  rss_start_MB=round(rss_start), rss_imports_MB=round(rss_imports), rss_built_MB=round(rss_built),
                  rss_ready_MB=round(rss_ready), peak_rss_MB=round(sampler.peak),
                  ru_maxrss_MB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  build_s=round(build_s, 1), step_wall_s=[round(x, 2) for x in wall],
                  step_cpu_s=[round(x, 2) for x in cpu], loss=round(loss, 4))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        result["profile_self_cpu_s"] = _classify(prof.key_averages(group_by_input_shape=True), args.r)
    return result


def breakdown(args) -> dict:
    """CPU seconds per training step by component, timed one op at a time on the config's layer
    shapes (CPU time, so it holds on a loaded machine, unlike the profiler's wall clock): the nf4
    dequantize (twice per quantized linear: forward, and backward's re-dequantize), the base GEMMs
    (y = x Wᵀ and dx = dy W, bf16), and the LoRA adapter (fp32, forward and backward) on q/k/v/o.
    Attention, norms, embedding, lm_head and the optimizer are not included. On a loaded machine use
    --threads 1: idle OpenMP threads spin, and their spinning counts as CPU time (with 2 threads on a
    machine at load 15, a rank-8 LoRA step read 25x its single-thread CPU time)."""
    import torch
    import bitsandbytes.functional as F4

    torch.set_num_threads(args.threads)
    bf16, tokens, r = torch.bfloat16, args.seq, args.r
    h, i = args.hidden, args.intermediate
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]  # q, k, v, o, gate, up, down: (out, in)

    def cpu(fn, reps=3):
        fn()
        t = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - t) / reps

    out = {"dequantize (nf4, fwd + bwd)": 0.0, "base GEMMs (bf16, fwd + dx)": 0.0, "LoRA adapter (fp32, fwd + bwd)": 0.0}
    for n, k in shapes:
        w = torch.randn(n, k, dtype=bf16) * 0.02
        q, state = F4.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        x, dy = torch.randn(tokens, k, dtype=bf16), torch.randn(tokens, n, dtype=bf16)
        out["dequantize (nf4, fwd + bwd)"] += 2 * cpu(lambda: F4.dequantize_4bit(q, state))
        out["base GEMMs (bf16, fwd + dx)"] += cpu(lambda: (x @ w.t(), dy @ w))
        if (n, k) == (h, h):
            a = torch.randn(r, k, requires_grad=True)
            b = torch.randn(n, r, requires_grad=True)
            xf = x.float().requires_grad_()

            def lora():
                y = (xf @ a.t()) @ b.t() * 2.0
                y.backward(dy.float())
            out["LoRA adapter (fp32, fwd + bwd)"] += cpu(lora)
    return {key: round(v * args.layers, 3) for key, v in out.items()}


# -- the parent: one fresh process per (mode, allocator) ---------------------------------------------
def _run_child(args, mode: str, malloc: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = malloc
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    cmd = [sys.executable, "-m", "benchmarks.qlora_memory", "--child", mode, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--steps", str(args.steps), "--r", str(args.r),
           "--threads", str(args.threads), "--lowering", args.lowering] + (["--profile"] if args.profile else [])
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"mode": mode, "malloc": malloc or "glibc default", "error": proc.stderr.strip().splitlines()[-1:]}


def table(results: list[dict]) -> str:
    lines = ["| mode | allocator | peak RSS (MB) | ÷ same side's bf16 | ÷ PEFT bf16 | peak − imports ÷ same (bf16) | "
             "CPU s/step (median after the first) |", "|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["malloc"]): r for r in results if "peak_rss_MB" in r}
    for r in results:
        if "peak_rss_MB" not in r:
            lines.append(f"| {r['mode']} | {r['malloc']} | error: {r.get('error')} | | | | |")
            continue
        side = r["mode"].split("-")[0]
        ref = by.get((f"{side}-bf16", r["malloc"]))
        peft_ref = by.get(("peft-bf16", r["malloc"]))
        steady = r["step_cpu_s"][1:] or r["step_cpu_s"]  # the first step captures (ours) and warms up
        cpu = sorted(steady)[len(steady) // 2]

        def ratio(a, b, base=0):
            return f"{(a - base) / (b - base):.2f}×" if b else "–"

        lines.append(
            f"| {r['mode']} | {r['malloc']} | {r['peak_rss_MB']} | "
            f"{ratio(r['peak_rss_MB'], ref['peak_rss_MB']) if ref else '–'} | "
            f"{ratio(r['peak_rss_MB'], peft_ref['peak_rss_MB']) if peft_ref else '–'} | "
            f"{ratio(r['peak_rss_MB'], ref['peak_rss_MB'], r['rss_imports_MB']) if ref else '–'} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--allocators", default="both", choices=["both", "default", "mmap64k"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lowering", default="eager", choices=["eager", "inductor"])
    p.add_argument("--profile", action="store_true", help="also profile one step per mode (where the time goes)")
    p.add_argument("--timeout", type=int, default=7200)
    p.add_argument("--out", default=str(HERE / "results_qlora.json"))
    p.add_argument("--breakdown", action="store_true", help="only: CPU seconds per step by component (see breakdown())")
    args = p.parse_args(argv)
    if args.breakdown:
        print(json.dumps(breakdown(args), indent=1))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    allocators = {"both": list(ALLOCATORS.items()), "default": [("glibc default", None)],
                  "mmap64k": [("MALLOC_MMAP_THRESHOLD_=65536", "65536")]}[args.allocators]
    results = []
    for _, malloc in allocators:
        for mode in args.modes.split(","):
            res = _run_child(args, mode, malloc)
            print(json.dumps(res), flush=True)
            results.append(res)
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
