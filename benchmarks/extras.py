"""Benchmarks that are not "one adapter vs the frozen base" (issues 5 and 6):

* X-LoRA, 4 frozen LoRA experts (r=16, q/k/v/o) + the trainable classifier: training step against
  our own LoRA training step (the dual forward pass is inherent), and against PEFT eager.
* A mixed batch over 8 LoRA adapters (one adapter per sample, `adapter_names=`): unmerged forward
  against a single-adapter unmerged forward of the same module, and against PEFT's
  `adapter_names` path.

Both use the standard model; the mixed batch uses 8 samples × 128 tokens so all 8 adapters occur.
"""

from __future__ import annotations

import copy
import tempfile

import torch

from .methods import ATTN
from .run import _fmt, _ratio, bench_peft, randomize, standard_batch, time_train_and_infer, timeit


def _expert_dirs(model, root, n=4, r=16):
    """n PEFT LoRA checkpoints of the standard model with random (trained-looking) weights."""
    import peft

    dirs = {}
    for i in range(n):
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTN))
        randomize([p for n_, p in pm.named_parameters() if "lora_" in n_], seed=i)
        path = f"{root}/expert{i}"
        pm.save_pretrained(path)
        dirs[str(i)] = path
    return dirs


def bench_xlora(model, batch, steps, run_peer) -> dict:
    import peft

    import adapt_compiler as ac

    hidden = model.config.hidden_size
    with tempfile.TemporaryDirectory() as root:
        dirs = _expert_dirs(model, root)

        def ours():
            m = ac.compile(model, ac.XLoRA(experts=dirs, hidden_size=hidden))
            randomize(m.adapter_parameters())
            return time_train_and_infer(m, m, m.adapter_parameters(), batch, steps)

        def theirs(compiled):
            config = lambda: peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters=dirs)  # noqa: E731
            return lambda: bench_peft(model, config, batch, steps, compiled)

        return {"ours": run_peer("ours", ours), "peft_eager": run_peer("peft_eager", theirs(False)),
                "peft_compile": run_peer("peft_compile", theirs(True))}


def bench_mixed(model, steps, run_peer, n_adapters=8) -> dict:
    import peft

    import adapt_compiler as ac

    batch = standard_batch(batch=n_adapters)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    names = [f"a{i}" for i in range(n_adapters)]

    def timed(module, **extra):
        def run():
            with torch.no_grad():
                module(**inputs, **extra)
        return timeit(run, steps)

    def ours():
        m = ac.compile(model, {n: ac.LoRA(r=16, alpha=32, targets=ATTN) for n in names}).eval()
        randomize(m.adapter_parameters())
        m.set_adapter(names[0])
        single = timed(m)
        return {"single_ms": single, "mixed_ms": timed(m, adapter_names=names)}

    def theirs():
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN),
                                 adapter_name=names[0])
        for n in names[1:]:
            pm.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN))
        randomize([p for n_, p in pm.named_parameters() if "lora_" in n_])
        pm.eval()
        pm.set_adapter(names[0])
        return {"single_ms": timed(pm), "mixed_ms": timed(pm, adapter_names=names)}

    return {"ours": run_peer("ours", ours), "peft_eager": run_peer("peft_eager", theirs)}


def _r(a, b):
    return _fmt(_ratio(a, b))


def extras_table(results) -> str:
    lines = []
    x, lora = results.get("xlora"), results.get("lora", {}).get("ours", {})
    if x:
        o, pe, pc = x.get("ours", {}), x.get("peft_eager", {}), x.get("peft_compile", {})
        lines += [
            "X-LoRA (4 experts, r=16, q/k/v/o): training step relative to **our LoRA training step** "
            f"({lora.get('train_ms', float('nan')):.1f} ms)",
            "",
            "| | ours | PEFT eager | PEFT compile |",
            "|---|---|---|---|",
            f"| train step / our LoRA step | {_r(o.get('train_ms'), lora.get('train_ms'))} "
            f"| {_r(pe.get('train_ms'), lora.get('train_ms'))} | {_r(pc.get('train_ms'), lora.get('train_ms'))} |",
            f"| eval forward / our LoRA forward | {_r(o.get('infer_ms'), lora.get('infer_ms'))} "
            f"| {_r(pe.get('infer_ms'), lora.get('infer_ms'))} | {_r(pc.get('infer_ms'), lora.get('infer_ms'))} |",
            "",
        ]
        for label, peer in (("PEFT eager", pe), ("PEFT compile", pc)):
            if "error" in peer:
                lines += [f"{label} failed: `{peer['error']}`", ""]
    mix = results.get("mixed8")
    if mix:
        o, pe = mix.get("ours", {}), mix.get("peft_eager", {})
        lines += [
            "Mixed batch, 8 LoRA adapters (r=16, q/k/v/o), 8 × 128 tokens, one adapter per sample:",
            "",
            "| | single-adapter forward (ms) | mixed forward (ms) | mixed / single | mixed / PEFT mixed |",
            "|---|---|---|---|---|",
            f"| ours | {o.get('single_ms', float('nan')):.1f} | {o.get('mixed_ms', float('nan')):.1f} "
            f"| {_r(o.get('mixed_ms'), o.get('single_ms'))} | {_r(o.get('mixed_ms'), pe.get('mixed_ms'))} |",
            f"| PEFT eager | {pe.get('single_ms', float('nan')):.1f} | {pe.get('mixed_ms', float('nan')):.1f} "
            f"| {_r(pe.get('mixed_ms'), pe.get('single_ms'))} | 1.00× |",
            "",
        ]
    return "\n".join(lines)
