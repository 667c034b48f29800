"""Load a PEFT adapter directory, check it against PEFT, merge it, and deploy an AOTInductor package.

    python examples/peft_adapter_merge_deploy.py                 # needs `peft` (a test dependency)
    python examples/peft_adapter_merge_deploy.py --no-package    # export only (AOT compile is slow)

1. Make a PEFT LoRA adapter directory the usual way (`get_peft_model` + `save_pretrained`) on a
   small GPT-2 built from a config (random weights, nothing downloaded).
2. `ac.compile(model, "adapter_dir")` loads it (PEFT: `PeftModel.from_pretrained(model, dir)`);
   outputs match PEFT's.
3. `m.merged_module()` is a plain GPT-2 with the adapter folded into its weights (PEFT:
   `merge_and_unload()`), and `ac.export(m, ..., merge=True)` + `ac.package(ep, "model.pt2")` turn
   it into an AOTInductor package that `torch._inductor.aoti_load_package` runs without Python
   model code (and without adapt_compiler).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import adapt_compiler as ac
from adapt_compiler.progress import status


def make_peft_adapter(model, path: Path) -> None:
    """A PEFT LoRA adapter with non-trivial weights (PEFT initialises lora_B to zero)."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(path)


def export_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("adapt_compiler.export") is not None


def main(steps: int = 3, quiet: bool = False, lowering: str = "inductor", package: bool = True,
         out_dir: str | None = None) -> dict:
    """`steps`: how many random batches to compare on. `package=False` stops after torch.export."""
    import peft

    say = (lambda *a: None) if quiet else print
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    tmp = tempfile.TemporaryDirectory()
    root = Path(out_dir or tmp.name)
    adapter_dir = root / "peft_adapter"
    make_peft_adapter(model, adapter_dir)
    say(f"PEFT adapter written to {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")

    # -- load the directory; compare with PEFT --------------------------------------------------
    m = ac.compile(model, str(adapter_dir), lowering=lowering).eval()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2 + i, 10 + 3 * i), generator=g) for i in range(max(1, steps))]
    result = {"vs_peft": 0.0}
    with torch.no_grad():
        for ids in batches:
            diff = (m(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
            result["vs_peft"] = max(result["vs_peft"], diff)
    say(f"ours vs PEFT on {len(batches)} batches: max |Δ| = {result['vs_peft']:.2e}")

    # -- merge: a plain GPT-2 with the adapter folded in ----------------------------------------
    merged = m.merged_module()
    ids = batches[0]
    with torch.no_grad():
        want = m(input_ids=ids).logits
        result["merged_module"] = (merged(input_ids=ids).logits - want).abs().max().item()
    say(f"merged_module() ({type(merged).__name__}) vs adapted: max |Δ| = {result['merged_module']:.2e}")

    # -- deploy: torch.export, then an AOTInductor package --------------------------------------
    if not export_available():
        say("ac.export is not available in this version; stopping before deployment")
        return result
    with status("torch.export of the merged model", quiet=quiet):
        ep = ac.export(m, kwargs={"input_ids": ids}, merge=True)  # dynamic batch and sequence length
    other = batches[-1]
    with torch.no_grad():
        out = ep.module()(input_ids=other)
        logits = out[0] if isinstance(out, (tuple, list)) else out.logits
        result["exported"] = (logits - m(input_ids=other).logits).abs().max().item()
    say(f"ExportedProgram on a batch of another shape {tuple(other.shape)}: "
        f"max |Δ| = {result['exported']:.2e}")
    if package:
        with status("AOTInductor package (compiles C++; a minute or two)", quiet=quiet):
            path = ac.package(ep, root / "model.pt2")
        runner = torch._inductor.aoti_load_package(str(path))
        with torch.no_grad():
            out = runner(input_ids=other)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        result["package"] = (logits - m(input_ids=other).logits).abs().max().item()
        say(f"{path.name} ({path.stat().st_size / 1e6:.1f} MB) runs: max |Δ| = {result['package']:.2e}")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="batches to compare on")
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--no-package", action="store_true", help="stop after torch.export (no AOTInductor)")
    parser.add_argument("--out", default=None, help="keep the adapter and package in this directory")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    main(steps=args.steps, quiet=args.quiet, lowering=args.lowering, package=not args.no_package,
         out_dir=args.out)
