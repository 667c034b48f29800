"""Peak RSS and step time of a QLoRA training step: ours and PEFT, 4-bit (nf4) against bf16.

    python -m benchmarks.qlora_memory                       # the 1B Llama shape, every mode, both allocators
    python -m benchmarks.qlora_memory --layers 2 --steps 2  # a quick check of the harness
    python -m benchmarks.qlora_memory --profile             # + where the step time goes (torch.profiler)
    python -m benchmarks.qlora_memory --breakdown           # CPU s/step: dequantize vs GEMM vs adapter, op by op
    python -m benchmarks.qlora_memory --speed --steps 3     # ours vs PEFT QLoRA step time, interleaved, + profiles
    python -m benchmarks.qlora_memory --modes ours-nf4,peft-nf4 --allocators mmap64k --tensors
                                                            # + peak live tensor bytes, saved-for-backward bytes

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
sampled every 10 ms during the steps (also per step), and ru_maxrss (construction included);
rest_rss_MB = RSS after each step, garbage collected and trimmed: what a step leaves behind (ours:
the captured graph, which the first step builds). --tensors separates tensors from the rest of the
process: the peak of live tensor bytes in one step and the bytes saved for backward. Allocators: glibc's
default, and MALLOC_MMAP_THRESHOLD_=65536, which makes glibc return the transient dequantized
weights (8-22 MB each, freed within a layer) to the OS instead of keeping them in a heap that never
shrinks. Results: benchmarks/results_qlora.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.phases import Phases

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
        self.peak, self.step_peak, self._stop = 0.0, 0.0, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            rss = _rss_mb()
            self.peak, self.step_peak = max(self.peak, rss), max(self.step_peak, rss)
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


CATEGORIES = ("dequantize (nf4 -> bf16)", "base GEMMs (q/k/v/o/MLP, fwd + dx)", "LoRA adapter GEMMs (rank-r operand)",
              "lm_head GEMMs", "attention (SDPA)", "optimizer (AdamW)", "everything else")
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _classify(events, r: int, vocab: int) -> dict:
    """Self time (s) of a profiled step's ops by where they go. `events`: the profiler's function
    events (one thread: --threads 1). An op under AdamW's step is the optimizer's; a GEMM with a
    rank-r operand dimension is the adapter's, with a vocab-size one the lm_head's, any other GEMM
    a base layer's (attention is SDPA, not a GEMM op); dequantize is bitsandbytes' dequantize ops
    (in ours and PEFT's alike: the forward's inside gemm_4bit, the backward's re-dequantize)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        if e.name == "[memory]":
            continue
        t = e.self_cpu_time_total / 1e6
        parent, in_optimizer = e.cpu_parent, False
        while parent is not None and not in_optimizer:
            in_optimizer = parent.name.startswith("Optimizer.step")
            parent = parent.cpu_parent
        shapes = [tuple(s) for s in (e.input_shapes or []) if s]
        if in_optimizer or e.name.startswith("Optimizer.step"):
            key = "optimizer (AdamW)"
        elif "dequantize" in e.name:
            key = "dequantize (nf4 -> bf16)"
        elif "scaled_dot_product" in e.name:
            key = "attention (SDPA)"
        elif e.name in _GEMMS:
            key = ("LoRA adapter GEMMs (rank-r operand)" if any(r in sh for sh in shapes) else
                   "lm_head GEMMs" if any(vocab in sh for sh in shapes) else "base GEMMs (q/k/v/o/MLP, fwd + dx)")
        else:
            key = "everything else"
        out[key] += t
    return out


def _profile_step(step, r: int, vocab: int) -> dict:
    """One step under torch.profiler: self time per category (wall clock of this thread, which on a
    loaded machine includes waiting for a core) and the same shares of the step's thread CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        c = time.thread_time()
        step()
        cpu = time.thread_time() - c
    by = _classify(prof.profiler.function_events, r, vocab)
    total = sum(by.values())
    return {"thread_cpu_s": round(cpu, 3), "profiled_wall_s": round(total, 3),
            "cpu_s": {k: round(cpu * v / total, 3) for k, v in by.items()},
            "share": {k: round(v / total, 3) for k, v in by.items()}}


def _tensor_memory(net, step, params) -> dict:
    """What the step's tensors hold, independent of the allocator: the peak of live tensor bytes in
    one step (torch.profiler's memory timeline: every tensor the step allocates or touches, the
    model's weights included) and the bytes autograd saves for the backward (unique storages, not
    counting parameters or the model's weights)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # private; a benchmark's attribution aid only

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live, cur, peak = {}, 0, 0
    for _, action, key, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live[key] = size
            cur += size
        elif action == Action.INCREMENT_VERSION:
            live[(key[0], key[1] + 1)] = live.pop(key, size)
        elif action == Action.DESTROY:
            cur -= live.pop(key, 0)
        peak = max(peak, cur)
    owned = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers(), *params]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"peak_live_tensors_MB": round(peak / 2**20, 1), "saved_for_backward_MB": round(sum(saved.values()) / 2**20, 1)}


def _training(who: str, model, args):
    """(the trained module, its step function, its trainable tensors) for ours or PEFT over `model`."""
    import peft
    import torch

    import adapt_compiler as ac

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

    return net, step, params


def child(args) -> dict:
    rss_start = _rss_mb()
    import torch

    torch.set_num_threads(args.threads)
    import peft  # noqa: F401 - imported in every mode, so the import baseline is the same
    import transformers  # noqa: F401

    import adapt_compiler as ac  # noqa: F401

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
    net, step, params = _training(who, model, args)

    _malloc_trim()
    rss_ready = _rss_mb()
    wall, cpu, peaks, rest = [], [], [], []
    # a compiled lowering: where the first step's time goes (capture, passes, AOTAutograd + Inductor, ...)
    phases = Phases() if who == "ours" and args.lowering != "eager" else contextlib.nullcontext()
    with _PeakSampler() as sampler, phases:
        for _ in range(args.steps):
            sampler.step_peak = _rss_mb()
            t, c = time.perf_counter(), time.process_time()
            loss = step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            peaks.append(round(max(sampler.step_peak, _rss_mb())))
            gc.collect()
            _malloc_trim()
            rest.append(round(_rss_mb()))  # what stays after the step (ours: the capture's graph)
            if isinstance(phases, Phases) and len(wall) == 1:
                first_phases = phases.seconds()
    result = dict(mode=args.child, malloc=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
                  layers=args.layers, hidden=args.hidden, seq=args.seq, lowering=args.lowering if who == "ours" else "",
                  params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                  rss_start_MB=round(rss_start), rss_imports_MB=round(rss_imports), rss_built_MB=round(rss_built),
                  rss_ready_MB=round(rss_ready), peak_rss_MB=round(sampler.peak), step_peak_rss_MB=peaks, rest_rss_MB=rest,
                  ru_maxrss_MB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  build_s=round(build_s, 1), step_wall_s=[round(x, 2) for x in wall],
                  step_cpu_s=[round(x, 2) for x in cpu], loss=round(loss, 4))
    if isinstance(phases, Phases):
        result["first_step_phases_s"] = first_phases  # {phase: (wall, cpu)}
    if args.profile:
        result["profile"] = _profile_step(step, args.r, args.vocab)
    if args.tensors:
        result.update(_tensor_memory(net, step, params))
    return result


def speed(args) -> dict:
    """Step time, ours against PEFT's QLoRA, in one process over the same quantized weights: the nf4
    model is built once, a second module tree shares its packed weights (deepcopy with every tensor
    and quant state memoised), PEFT wraps one tree and ac.compile the other. Steps alternate (ours,
    PEFT, ours, ...) so load on a shared machine hits both alike; each step's time is the CPU time of
    this thread (time.thread_time) under torch.set_num_threads(1), so waiting for a core is not
    counted. Then one profiled step per side: where the time goes (_profile_step)."""
    import torch

    torch.set_num_threads(1)
    model = build_model(args, "nf4")
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for mod in model.modules():
        if getattr(mod, "quant_state", None) is not None:
            memo[id(mod.quant_state)] = mod.quant_state
    twin = copy.deepcopy(model, memo)
    sides = {"ours": _training("ours", model, args), "peft": _training("peft", twin, args)}
    first = {who: s[1]() for who, s in sides.items()}  # ours captures here; both warm up
    cpu = {who: [] for who in sides}
    losses = {}
    for _ in range(args.steps):
        for who, (_, step, _) in sides.items():
            c = time.thread_time()
            losses[who] = step()
            cpu[who].append(round(time.thread_time() - c, 3))
    median = {who: sorted(v)[len(v) // 2] for who, v in cpu.items()}
    out = {"layers": args.layers, "seq": args.seq, "threads": 1, "first_step_loss": first, "loss": losses,
           "thread_cpu_s": cpu, "median_thread_cpu_s": median,
           "ours_over_peft": round(median["ours"] / median["peft"], 3),
           "load_average": os.getloadavg()}
    out["profile"] = {who: _profile_step(s[1], args.r, args.vocab) for who, s in sides.items()}
    return out


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
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora_inductor_")  # a cold compile in every child
    cmd = [sys.executable, "-m", "benchmarks.qlora_memory", "--child", mode, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--steps", str(args.steps), "--r", str(args.r),
           "--threads", str(args.threads), "--lowering", args.lowering] + (["--profile"] if args.profile else []) \
        + (["--tensors"] if args.tensors else [])
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
    p.add_argument("--lowering", default="eager", choices=["eager", "inductor", "regional"])
    p.add_argument("--profile", action="store_true", help="also profile one step per mode (where the time goes)")
    p.add_argument("--timeout", type=int, default=7200)
    p.add_argument("--out", default=str(HERE / "results_qlora.json"))
    p.add_argument("--breakdown", action="store_true", help="only: CPU seconds per step by component (see breakdown())")
    p.add_argument("--tensors", action="store_true",
                   help="also: peak live tensor bytes and saved-for-backward bytes of one step per mode")
    p.add_argument("--speed", action="store_true",
                   help="only: ours vs PEFT QLoRA step time, interleaved in one process, and a profile of each (speed())")
    args = p.parse_args(argv)
    if args.breakdown:
        print(json.dumps(breakdown(args), indent=1))
        return 0
    if args.speed:
        res = speed(args)
        print(json.dumps(res, indent=1))
        Path(args.out).with_name("results_qlora_speed.json").write_text(json.dumps(res, indent=1))
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
