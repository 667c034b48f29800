"""`adapt-compiler export`: a base model plus a PEFT adapter directory -> a deployable artifact.

    adapt-compiler export --model MODEL --adapter DIR [--merge | --no-merge] --format pt2|onnx|ep --out PATH

MODEL is what `commands/_models.py` understands: `python:package.module:factory` (a function returning
an nn.Module; the `python:` prefix is optional), a transformers config JSON file (the architecture
with random weights, for trying the pipeline), a local transformers model directory (config +
weights), or a builtin tiny model name. Example inputs are token ids
of shape (--batch, --seq) for models with a vocabulary, or what `--inputs python:module:fn` returns.
Formats: pt2 = AOTInductor package, onnx = ONNX model, ep = torch.export.save of the program.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("export", help="export a model + PEFT adapter as an AOTInductor package, ONNX or ExportedProgram",
                       description=__doc__.split("\n\n")[0])
    from ._models import MODEL_HELP

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--merge", dest="merge", action="store_true", default=None,
                   help="fold the adapter into the weights (default when the method is mergeable)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep the adapter weights separate (swappable with load_constants in a pt2 package)")
    p.add_argument("--format", choices=["pt2", "onnx", "ep"], default="pt2", help="artifact format (default pt2)")
    p.add_argument("--out", required=True, help="output file (.pt2 for pt2/ep, .onnx for onnx)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2; the program stays dynamic)")
    p.add_argument("--seq", type=int, default=8, help="example sequence length (default 8; stays dynamic)")
    p.add_argument("--inputs", default=None, help="python:module:fn returning example inputs (tensor, tuple or dict)")
    p.add_argument("--static", action="store_true", help="export with static shapes (the example's sizes only)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights / example inputs (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress display and no summary")
    return p


class _Steps:
    """Progress for the long steps: a rich spinner on a terminal, plain lines otherwise, nothing if quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.console = None
        if not quiet and self.tty:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, what: str):
        t = time.perf_counter()
        if self.quiet:
            yield
            return
        if self.console is not None:
            with self.console.status(f"{what} ..."):
                yield
            self.console.print(f"[green]✓[/green] {what} ({time.perf_counter() - t:.1f} s)")
        else:
            print(f"{what} ...", file=sys.stderr, flush=True)
            yield
            print(f"  done ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)


def _error(msg: str):
    from ..errors import ExportError

    return ExportError(msg)


def _load_model(ref: str):
    from ._models import load_model

    model = load_model(ref)
    model.eval()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # export the plain forward (no KV cache objects)
    return model


def _example_inputs(model, args):
    import torch

    if args.inputs:
        from ._models import import_object

        inputs = import_object(args.inputs, "--inputs")
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise _error("--model has no config.vocab_size, so token inputs cannot be made up; pass "
                         "--inputs python:module:fn returning example inputs.")
        if args.batch < 1 or args.seq < 1:
            raise _error(f"--batch {args.batch} / --seq {args.seq}: both must be >= 1 (>= 2 keeps them dynamic).")
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, int(vocab), (args.batch, args.seq), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def run(args) -> int:
    import torch

    import adapt_compiler as ac
    from ..export import _target, export_onnx, export_program, package_program, save_program
    from ..passes import method_for

    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    out = _target(args.out, args.force, suffix)  # refuse an existing path before any long step
    torch.manual_seed(args.seed)
    steps = _Steps(args.quiet)
    with steps.step(f"load model {args.model}"):
        model = _load_model(args.model)
    with steps.step(f"load adapter {args.adapter}"):
        m = ac.compile(model, str(args.adapter), lowering="eager")
        m.eval()
    merge = args.merge
    mergeable = all(method_for(m.state.specs[n]).merge_kind != "none" for n in m.active_adapters)
    if merge is None:
        merge = mergeable
    elif merge and not mergeable:
        raise _error(f"--merge: adapter {m.active_adapters[0]!r} ({method_for(m.state.specs[m.active_adapters[0]]).name}) "
                     f"has no weight form; export it with --no-merge.")
    ex_args, ex_kwargs = _example_inputs(model, args)
    dynamic = not args.static
    if args.format == "onnx":
        with steps.step("export to ONNX (torch.export + dynamo ONNX exporter)"):
            path = export_onnx(m, ex_args, out, kwargs=ex_kwargs, force=args.force, merge=merge, dynamic=dynamic)
    else:
        with steps.step(f"torch.export ({'merged' if merge else 'unmerged'}, "
                        f"{'static' if args.static else 'dynamic batch/seq'})"):
            ep = export_program(m, ex_args, ex_kwargs, merge=merge, dynamic=dynamic)
        if args.format == "ep":
            with steps.step("save ExportedProgram"):
                path = save_program(ep, out, force=args.force)
        else:
            with steps.step("AOTInductor compile + package (takes a while)"):
                path = package_program(ep, out, force=args.force)
    if not args.quiet:
        size = Path(path).stat().st_size / 1e6
        print(f"wrote {path} ({args.format}, {'merged' if merge else 'unmerged'}, {size:.2f} MB)")
    return 0
