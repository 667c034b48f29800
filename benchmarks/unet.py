"""A diffusers UNet training step: adapt_compiler (default lowering, guarded) vs PEFT eager vs PEFT + torch.compile.

    python -m benchmarks.unet                      # issue 17's UNet: 16×16 latents, channels (32, 64), batch 4
    python -m benchmarks.unet --methods lora,loha,lokr --steps 10
    python -m benchmarks.unet --sample 8 --channels 16,32 --batch 2 --steps 2 --methods lora   # a quick check

The UNet2DConditionModel is issue 17's (CrossAttnDownBlock2D + DownBlock2D, UpBlock2D +
CrossAttnUpBlock2D, cross-attention dim 32), built from a config with random weights. Adapters: LoRA
r=4 on to_q/to_k/to_v/to_out.0; LoHa r=4 and LoKr r=4 on to_q, to_v, conv1, conv2; non-trivial random
weights, the same in every peer. A step is forward, a square loss on the predicted noise, backward,
AdamW on the adapter parameters.

Per peer and method:
  step_ms      median step time, the peers timed in turns (a, b, c, a, b, c, ...: drift hits all alike)
  first_s      the first step: capture + compile (+ for ours the guard's one eager check)
  grads_ok     whether the first step's adapter gradients equal PEFT eager's (rtol 1e-4, atol 1e-6 · scale)
  bad_grads    how many adapter gradient tensors differ (of how many)
  guard        ours only: the guard's verdict ("passed", or "mismatch" = fell back to eager)
The frozen base (no adapter) is timed too, eager and compiled, as the floor. Results are written to
benchmarks/results_unet.json and printed as a markdown table. Timings on a shared machine are noisy:
rerun on a quiet one for numbers to quote; the grads_ok column does not depend on the load.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from .run import describe, time_in_turns

HERE = Path(__file__).parent
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def unet(sample: int, channels: tuple[int, int], seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=min(32, channels[0]),
    ).eval()


def batch_of(batch: int, sample: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, 4, sample, sample, generator=g), torch.randint(0, 1000, (batch,), generator=g)),
            {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)})


def methods():
    import peft

    import adapt_compiler as ac

    lycoris = ["to_q", "to_v", "conv1", "conv2"]
    return {
        "lora": (ac.LoRA(r=4, alpha=8, targets=ATTENTION), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION)),
        "loha": (ac.LoHa(r=4, alpha=4, targets=lycoris), peft.LoHaConfig(r=4, alpha=4, target_modules=lycoris)),
        "lokr": (ac.LoKr(r=4, alpha=4, targets=lycoris), peft.LoKrConfig(r=4, alpha=4, target_modules=lycoris)),
    }


def _randomize(module, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _peft_grads(pm) -> dict:
    """PEFT's adapter gradients keyed like its saved state dict (the `.default` adapter name dropped)."""
    return {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}


def _our_grads(m) -> dict:
    from adapt_compiler.checkpoint import adapter_state_dict

    return {k: t.grad for k, t in adapter_state_dict(m.table, "default", live=True).items()}


def _compare(got: dict, want: dict) -> tuple[bool, int, int]:
    """(all equal, how many differ, how many compared): rtol 1e-4 of each tensor's scale."""
    bad = 0
    for k, w in want.items():
        g = got.get(k)
        if g is None or w is None or g.shape != w.shape:
            bad += 1
            continue
        scale = max(float(w.abs().max()), 1e-12)
        if float((g - w).abs().max()) > 1e-4 * scale + 1e-6:
            bad += 1
    return bad == 0, bad, len(want)


def _step(module, args, kwargs, opt=None):
    out = module(*args, **kwargs)
    loss = (out.sample if hasattr(out, "sample") else out[0]).square().mean()
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def bench_method(name, base, args, kwargs, steps: int) -> dict:
    import peft

    import adapt_compiler as ac
    from adapt_compiler.lowering.guard import CompilerMismatchWarning

    spec, config = methods()[name]
    pm_eager = peft.get_peft_model(copy.deepcopy(base), config).train()
    _randomize(pm_eager)
    pm_compiled_model = copy.deepcopy(pm_eager)
    pm_compiled = torch.compile(pm_compiled_model)
    ours = ac.compile(base, spec).train()  # default lowering (Inductor), guarded
    ours.load_adapter_state_dict(peft.get_peft_model_state_dict(pm_eager))

    row = {"method": name}
    # the first step of each peer, from the same weights: gradients against PEFT eager's
    t = time.perf_counter()
    _step(pm_eager, args, kwargs)
    row["peft_eager"] = {"first_s": time.perf_counter() - t, "grads_ok": True, "bad_grads": 0}
    want = _peft_grads(pm_eager)
    for peer, module, grads_of in (("peft_compile", pm_compiled, lambda: _peft_grads(pm_compiled_model)),
                                   ("ours", ours, lambda: _our_grads(ours))):
        t = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CompilerMismatchWarning)
                _step(module, args, kwargs)
        except Exception as err:  # noqa: BLE001 - a failing peer is reported, not fatal
            row[peer] = {"error": describe(err)}
            continue
        ok, bad, total = _compare(grads_of(), want)
        row[peer] = {"first_s": time.perf_counter() - t, "grads_ok": ok, "bad_grads": f"{bad}/{total}"}
        if peer == "ours":
            ((_, verdict),) = ours.report().checks or [(None, None)]
            row[peer]["guard"] = verdict.status if verdict is not None else "not checked"
            row[peer]["guard_warned"] = any(issubclass(w.category, CompilerMismatchWarning) for w in caught)
    # then time them in turns, each with its own optimizer
    fns = {}
    for peer, module, params in (("peft_eager", pm_eager, [p for p in pm_eager.parameters() if p.requires_grad]),
                                 ("peft_compile", pm_compiled, [p for p in pm_compiled_model.parameters()
                                                                if p.requires_grad]),
                                 ("ours", ours, ours.adapter_parameters())):
        if "error" in row[peer]:
            continue
        opt = torch.optim.AdamW(params, lr=1e-4)
        fns[peer] = (lambda module=module, opt=opt: _step(module, args, kwargs, opt))
    for peer, ms in time_in_turns(fns, steps, warmup=1).items():
        row[peer]["step_ms"] = ms
    return row


def bench_base(base, args, kwargs, steps: int) -> dict:
    """The frozen UNet, no adapter: forward + backward to the input latents, eager and compiled."""
    frozen = copy.deepcopy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(frozen)

    def step_of(module):
        def step():
            x = args[0].clone().requires_grad_()
            module(x, *args[1:], **kwargs).sample.square().mean().backward()
        return step

    return time_in_turns({"eager": step_of(frozen), "compiled": step_of(compiled)}, steps, warmup=1)


def markdown(results: dict) -> str:
    lines = ["| method | peer | step ms | ÷ PEFT eager | first step s | grads = PEFT eager's | guard |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        eager = row["peft_eager"].get("step_ms")
        for peer in ("peft_eager", "peft_compile", "ours"):
            r = row[peer]
            if "error" in r:
                lines.append(f"| {row['method']} | {peer} | failed: {r['error']} | | | | |")
                continue
            ratio = f"{r['step_ms'] / eager:.2f}×" if eager and r.get("step_ms") else ""
            grads = "yes" if r["grads_ok"] else f"**no** ({r['bad_grads']} differ)"
            guard = r.get("guard", "")
            if guard == "mismatch":
                guard = "mismatch → fell back to eager"
            lines.append(f"| {row['method']} | {peer} | {r.get('step_ms', float('nan')):.1f} | {ratio} | "
                         f"{r['first_s']:.1f} | {grads} | {guard} |")
    base = results["base"]
    lines.append(f"\nFrozen UNet (no adapter), forward + backward: {base['eager']:.1f} ms eager, "
                 f"{base['compiled']:.1f} ms compiled.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,loha,lokr")
    p.add_argument("--sample", type=int, default=16, help="latent size (default 16)")
    p.add_argument("--channels", default="32,64", help="block_out_channels (default 32,64)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per peer (default 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results_unet.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    base = unet(args.sample, channels)
    inputs, kwargs = batch_of(args.batch, args.sample)
    results = {"config": {"sample": args.sample, "channels": channels, "batch": args.batch, "steps": args.steps,
                          "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()},
               "rows": []}
    for name in args.methods.split(","):
        torch._dynamo.reset()
        results["rows"].append(bench_method(name, base, inputs, kwargs, args.steps))
        print(json.dumps(results["rows"][-1]), flush=True)
    results["base"] = bench_base(base, inputs, kwargs, args.steps)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
