"""`adapt-compiler generate`: greedy generation with a base model plus a PEFT adapter, with tokens/s.

    adapt-compiler generate --model MODEL --adapter DIR --prompt-ids 5,7,9 [--max-new-tokens 32]
                            [--lowering inductor|eager] [--dynamic-cache] [--eos ID]

MODEL as for `adapt-compiler export` (a builtin tiny model, a transformers config or model directory,
or python:MODULE:FACTORY). Generation is `m.generate(do_sample=False)` with the KV cache on (a static
cache unless --dynamic-cache), so the decode step is one compiled graph. A warm-up call (2 new tokens)
captures and compiles the graphs first; the tokens/s line times the second call only.
"""

from __future__ import annotations

import sys
import time


def add_parser(sub):
    p = sub.add_parser("generate", help="generate tokens with a model + PEFT adapter and print tokens/s",
                       description=__doc__.split("\n\n")[0])
    from ._models import MODEL_HELP

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids, e.g. 5,7,9")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--eos", type=int, default=None, help="stop at this token id (default: the model's, if any)")
    p.add_argument("--lowering", choices=["inductor", "eager"], default="inductor",
                   help="inductor (default: compiled prefill and decode graphs) or eager")
    p.add_argument("--dynamic-cache", action="store_true", help="a DynamicCache instead of a static cache")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    return p


def _prompt(text: str, vocab: int | None):
    import torch

    from ..errors import AdapterError

    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise AdapterError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 5,7,9.") from None
    if not ids:
        raise AdapterError("--prompt-ids: empty; pass at least one token id, e.g. 5,7,9.")
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise AdapterError(f"--prompt-ids: {bad} outside the model's vocabulary [0, {vocab}).")
    return torch.tensor([ids])


def run(args) -> int:
    import torch

    import adapt_compiler as ac
    from ..errors import AdapterError
    from ._models import load_model

    if args.max_new_tokens < 1:
        raise AdapterError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1.")
    model = load_model(args.model)
    model.eval()
    config = getattr(model, "config", None)
    ids = _prompt(args.prompt_ids, getattr(config, "vocab_size", None))
    m = ac.compile(model, str(args.adapter), lowering=args.lowering)
    m.eval()
    if not m.can_generate():
        raise AdapterError(f"--model {args.model}: {type(model).__name__} cannot generate (no language-modelling "
                           f"head); pass a causal-LM or encoder-decoder model.")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                  pad_token_id=getattr(config, "pad_token_id", None) or 0)
    if not args.dynamic_cache:
        kwargs["cache_implementation"] = "static"
    if args.eos is not None:
        kwargs["eos_token_id"] = args.eos
    with torch.no_grad():
        start = time.perf_counter()
        m.generate(**kwargs, max_new_tokens=min(2, args.max_new_tokens))  # warm-up: capture + compile
        warm = time.perf_counter() - start
        start = time.perf_counter()
        out = m.generate(**kwargs, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    if not args.quiet:
        print("tokens:", new)
        print(f"{len(new) / seconds:.1f} tokens/s ({len(new)} new tokens in {seconds:.3f} s, {args.lowering}, "
              f"{'dynamic' if args.dynamic_cache else 'static'} cache; warm-up {warm:.1f} s)")
        sys.stdout.flush()
    return 0
