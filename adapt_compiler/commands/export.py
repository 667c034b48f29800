"""`adapt-compiler export`: a base model plus a PEFT adapter directory -> a deployable artifact.

    adapt-compiler export --model MODEL --adapter DIR [--merge | --no-merge] --format pt2|onnx|ep --out PATH

MODEL is `python:package.module:factory` (a function returning an nn.Module; the `python:` prefix is
optional), a transformers config JSON file (the architecture with random weights, for trying the
pipeline), or a local transformers model directory (config + weights). Example inputs are token ids
of shape (--batch, --seq) for models with a vocabulary, or what `--inputs python:module:fn` returns.
Formats: pt2 = AOTInductor package, onnx = ONNX model, ep = torch.export.save of the program.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("export", help="export a model + PEFT adapter as an AOTInductor package, ONNX or ExportedProgram",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="python:module:factory | path to a transformers config.json | a local transformers model dir")
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
    from ..export import ExportError

    return ExportError(msg)


def _load_python(ref: str, what: str):
    ref = ref.removeprefix("python:")
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise _error(f"{what} {ref!r}: expected python:package.module:function (e.g. python:my_models:make_llama).")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory are importable
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise _error(f"{what}: cannot import module {mod_name!r} ({err}); check the name and PYTHONPATH.") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise _error(f"{what}: module {mod_name!r} has no attribute {attr!r}.")
    return fn() if callable(fn) else fn


def _load_model(ref: str):
    from torch import nn

    path = Path(ref)
    if ref.startswith("python:") or (":" in ref and not path.exists()):
        model = _load_python(ref, "--model")
    elif path.is_file() and path.suffix == ".json":
        model = _from_config(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = _from_pretrained(path)
    else:
        raise _error(f"--model {ref!r}: not found; pass python:module:factory, a transformers config .json file, "
                     f"or a local transformers model directory.")
    if not isinstance(model, nn.Module):
        raise _error(f"--model {ref!r} gave a {type(model).__name__}, not a torch.nn.Module.")
    model.eval()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # export the plain forward (no KV cache objects)
    return model


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _from_config(path: Path):
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise _error("--model: a config .json needs transformers installed.") from err
    try:
        data = json.loads(path.read_text())
        config = AutoConfig.for_model(**data) if "model_type" in data else None
    except (json.JSONDecodeError, ValueError, KeyError) as err:
        raise _error(f"--model {path}: not a transformers config ({err}).") from err
    if config is None:
        raise _error(f"--model {path}: no 'model_type' field; is this a transformers config.json?")
    cls = _model_class(config)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def _from_pretrained(path: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return _model_class(config).from_pretrained(str(path))


def _example_inputs(model, args):
    import torch

    if args.inputs:
        inputs = _load_python(args.inputs, "--inputs")
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
