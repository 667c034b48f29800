"""`adapt-compiler demo`: adapters compiled into a real architecture, trained, merged, saved, exported.

A small Llama (grouped-query attention) built from a `transformers` config with random weights
learns a synthetic next-token task (copy the sequence shifted by one) through LoRA adapters on the
attention projections. Then: merge and check merged == unmerged, save in PEFT format, reload, and
export + package the merged model and run the package once.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("demo", help="compile LoRA into a small Llama, train, merge, save, export")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--no-export", action="store_true", help="skip the AOTInductor package step")
    p.add_argument("--out", default=None, help="directory for the adapter and package (default: a temp dir)")
    p.add_argument("--quiet", action="store_true")
    return p


def _batch(vocab: int, batch: int, seq: int, generator):
    import torch

    # a learnable task: the next token is (token + 1) mod vocab
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    ids = (start + torch.arange(seq)) % vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapt_compiler as ac
    from adapt_compiler.progress import progress

    say = (lambda *a: None) if args.quiet else print
    timings = {}
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, use_cache=False)
    model = LlamaForCausalLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = ac.LoRA(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    say(f"model: Llama (GQA 4/2 heads) {sum(p.numel() for p in model.parameters()):,} params; spec: {spec.method} r={spec.r}")

    t = time.perf_counter()
    m = ac.compile(model, spec, lowering=args.lowering)
    m.train()
    opt = torch.optim.AdamW(m.adapter_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    timings["compile()"] = time.perf_counter() - t

    losses = []
    t = time.perf_counter()
    bar = progress(range(args.steps), desc="train", quiet=args.quiet)
    for step in bar:
        out = m(**_batch(config.vocab_size, 8, 32, g))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    timings[f"train {args.steps} steps (incl. capture + compile)"] = time.perf_counter() - t
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    say(f"loss: {first:.3f} -> {last:.3f}")
    if not last < 0.7 * first:
        raise SystemExit(f"demo: the loss did not drop clearly ({first:.3f} -> {last:.3f})")

    m.eval()
    batch = _batch(config.vocab_size, 4, 24, g)
    with torch.no_grad():
        unmerged = m(**batch).logits
        t = time.perf_counter()
        m.merge()
        merged = m(**batch).logits
        timings["merge"] = time.perf_counter() - t
        m.unmerge()
        err = (merged - unmerged).abs().max().item()
    say(f"merged vs unmerged: max |Δ| = {err:.2e}")
    assert err < 1e-3, err

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="adapt-compiler-demo-"))
    t = time.perf_counter()
    m.save_adapter(out_dir / "adapter")
    reloaded = ac.compile(model, str(out_dir / "adapter"), lowering="eager").eval()
    with torch.no_grad():
        err_reload = (reloaded(**batch).logits - unmerged).abs().max().item()
    timings["save + reload (PEFT format)"] = time.perf_counter() - t
    say(f"saved to {out_dir / 'adapter'}; reloaded vs trained: max |Δ| = {err_reload:.2e}")
    assert err_reload < 1e-4, err_reload

    if not args.no_export:
        t = time.perf_counter()
        ep = ac.export(m, kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                       merge=True)
        path = ac.package(ep, out_dir / "model.pt2")
        timings["export + AOTInductor package"] = time.perf_counter() - t
        runner = torch._inductor.aoti_load_package(str(path))
        with torch.no_grad():
            pkg = runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pkg_logits = pkg[0] if isinstance(pkg, (list, tuple)) else getattr(pkg, "logits", pkg)
        err_pkg = (pkg_logits - unmerged).abs().max().item()
        say(f"packaged {path} ({path.stat().st_size / 1e6:.1f} MB); package vs adapted: max |Δ| = {err_pkg:.2e}")
        assert err_pkg < 1e-3, err_pkg

    untouched = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    say(f"user's model unchanged: {untouched}")
    assert untouched
    say("")
    say(str(m.report()))
    say("")
    for what, seconds in timings.items():
        say(f"  {what:<48} {seconds:7.2f} s")
    return 0
