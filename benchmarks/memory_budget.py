"""Peak memory against step time: ac.compile(memory_budget=...) and gradient checkpointing, next to PEFT.

    python -m benchmarks.memory_budget                  # the issue's size: hidden 256, 8 layers, batch 8 x 512
    python -m benchmarks.memory_budget --small          # a quick check of the script (hidden 64, 2 layers, 2 x 64)
    python -m benchmarks.memory_budget --points ours,peft_ckpt --steps 5
    python -m benchmarks.memory_budget --as-is ...      # glibc's defaults, no trim: what a user's process holds

Every point runs in a fresh process (`--point NAME` runs one and prints a JSON line), because peak
RSS is a per-process high-water mark. A point builds the model, warms up (capture, compile and the
correctness guard's first call happen here), collects garbage, returns freed memory to the system
(malloc_trim), resets the kernel's high-water mark (/proc/self/clear_refs: 5) and times `--steps`
training steps (forward + backward + AdamW on the adapters). The point's process runs glibc malloc
with a fixed mmap threshold (point_env), so a freed tensor leaves RSS at once. Reported per point:

  step_peak_mb   the process's peak RSS over the timed steps: what the step needs plus what the
                 process holds (interpreter, libraries, compiled code, model, optimizer state)
  rss_before_mb  RSS right before the timed steps (what the process holds between steps)
  step_extra_mb  step_peak_mb - rss_before_mb: the step's own memory (activations kept for the
                 backward, gradients, transients), the number checkpointing and budgets act on
  lifetime_peak_mb  ru_maxrss of the whole process (includes capture/compile transients)
  held             what rss_before_mb is made of (`held_breakdown`): Python objects, the part of
                   Python's allocator arenas that holds none (fragmentation: an arena is returned
                   only when all of it is free), glibc malloc in use (C/C++ objects, tensors),
                   file-backed pages (shared libraries, compiled kernels), modules imported
  step_ms        median step time

Points: PEFT eager without and with HF gradient checkpointing (use_reentrant=False); ours
(Inductor, the default lowering) without checkpointing, with m.gradient_checkpointing_enable(), and at
five memory budgets (AOTAutograd's activation_memory_budget); ours in eager lowering with and
without checkpointing; PEFT under torch.compile (what a compiled process holds between steps); ours with
checkpointing and `verify=False` (no first-call check; with --as-is: what its process keeps of the compile). LoRA r=16 on q/k/v/o, Llama from config, vocab 2000, float32.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
BUDGETS = (0.8, 0.5, 0.2, 0.1, 0.05)
POINTS = ["peft", "peft_ckpt", "ours", "ours_ckpt", *[f"ours_budget_{b}" for b in BUDGETS], "eager", "eager_ckpt", "peft_compile",
          "ours_ckpt_unverified"]


def model_and_batch(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, batch, seq = (64, 2, 2, 64) if small else (256, 8, 8, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=2000,
                      max_position_embeddings=max(seq, 128), use_cache=False)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (batch, seq), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def build(point: str, model):
    """(module to train, its trainable parameters)."""
    if point.startswith("peft"):
        import peft

        pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN)).train()
        if point == "peft_ckpt":
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in pm.parameters() if p.requires_grad]
        return (torch.compile(pm) if point == "peft_compile" else pm), params
    import adapt_compiler as ac

    lowering = "eager" if point.startswith("eager") else "inductor"
    budget = float(point.rsplit("_", 1)[1]) if "budget" in point else None
    verify = not point.endswith("_unverified")  # ac.compile(verify=False): no first-call check
    m = ac.compile(model, ac.LoRA(r=16, alpha=32, targets=ATTN), lowering=lowering, memory_budget=budget,
                   verify=verify).train()
    if "_ckpt" in point:
        m.gradient_checkpointing_enable()
    return m, m.adapter_parameters()


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(trim: bool = True) -> bool:
    """Free the warmup's garbage (Dynamo's and AOTAutograd's compile-time objects sit in reference
    cycles until a full collection), return freed memory to the system (malloc_trim), then start a
    new high-water mark. `trim=False` (--as-is): only the last, so RSS is what the process holds by
    itself (what the library and glibc's defaults leave), as in a user's process."""
    if trim:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def _pymalloc_mb() -> tuple[float, float]:
    """(MB in live Python objects, MB of Python's arenas that hold none) from sys._debugmallocstats,
    which writes to the C stderr."""
    import tempfile

    with tempfile.TemporaryFile("w+") as tmp:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        stats = {k.strip().lstrip("#").strip(): int(v.strip().replace(",", ""))
                 for k, _, v in (ln.rpartition("=") for ln in tmp) if v.strip().replace(",", "").isdigit()}
    arenas = stats.get("arenas allocated current", 0) * (1 << 20)  # 1 MiB arenas (CPython 3.10+)
    live = stats.get("bytes in allocated blocks", 0)
    return round(live / 2**20, 1), round((arenas - live) / 2**20, 1)


def held_breakdown() -> dict:
    """What the process holds, by kind (MB; glibc and CPython >= 3.10 only, else {})."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    python, python_free = _pymalloc_mb()
    return {"python_objects_mb": python, "python_arenas_unused_mb": python_free,
            "malloc_in_use_mb": round((info.uordblks + info.hblkhd) / 2**20, 1),
            "file_mb": round(_rss_mb("RssFile"), 1), "modules": len(sys.modules)}


def run_point(point: str, steps: int, warmup: int, small: bool, trim: bool = True) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, batch = model_and_batch(small)
    module, params = build(point, model)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = module(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t0
    reset = _reset_peak(trim)
    before = _rss_mb("VmRSS")
    held = held_breakdown()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "point": point, "step_peak_mb": round(_rss_mb("VmHWM"), 1) if reset else None,
        "rss_before_mb": round(before, 1),
        "step_extra_mb": round(_rss_mb("VmHWM") - before, 1) if reset else None,
        "lifetime_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "step_ms": round(1000 * statistics.median(times), 1), "warmup_s": round(warm_s, 1), "held": held,
    }


def point_env() -> dict:
    """The environment of a point's process: glibc's malloc with a fixed mmap threshold, so every
    tensor above 128 KiB is its own mapping, returned to the system when freed. Without it, glibc
    raises the threshold as tensors are freed (up to 32 MiB), keeps the freed blocks in its heap, and
    RSS keeps the warmup's peak (capture, compile, the guard's eager + compiled first call): every
    point then reads the same high-water mark whatever the step itself needs."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", help="run one point in this process and print its JSON line")
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--as-is", action="store_true",
                        help="glibc's default malloc settings and no collection or trim before the timed steps: "
                             "what a user's process holds (freed memory that glibc keeps included)")
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(args.point, args.steps, args.warmup, args.small, trim=not args.as_is)))
        return 0
    rows = []
    for point in args.points.split(","):
        cmd = [sys.executable, "-m", "benchmarks.memory_budget", "--point", point, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--small"] if args.small else []) + (["--as-is"] if args.as_is else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ) if args.as_is else point_env())
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{")), None)
        if done.returncode or line is None:
            rows.append({"point": point, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
        else:
            rows.append(json.loads(line))
        print(json.dumps(rows[-1]), flush=True)
    ref = next((r for r in rows if r["point"] == "peft_ckpt" and r.get("step_peak_mb")), None)
    print("\n| point | step peak RSS (MB) | vs PEFT+ckpt | RSS between steps (MB) | step's own (MB) | vs PEFT+ckpt | step (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['point']} | error: {r['error']} | | | | | |")
            continue
        ratio = f"{r['step_peak_mb'] / ref['step_peak_mb']:.3f}x" if ref and r.get("step_peak_mb") else "-"
        own = f"{r['step_extra_mb'] / ref['step_extra_mb']:.3f}x" if ref and r.get("step_extra_mb") else "-"
        print(f"| {r['point']} | {r['step_peak_mb']} | {ratio} | {r['rss_before_mb']} | {r['step_extra_mb']} | {own} | "
              f"{r['step_ms']} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
