"""`adapt-compiler inspect`: what the compiler would do to a model, without training anything.

    adapt-compiler inspect --model llama --spec 'LoRA(r=8, targets=["q_proj", "v_proj"])'
    adapt-compiler inspect --model config.json --adapter path/to/peft_dir --unmatched
    adapt-compiler inspect --adapter style.safetensors          # a kohya/LyCORIS or diffusers file, no model
    adapt-compiler inspect --model python:my_pkg:build_unet --adapter style.safetensors
    adapt-compiler inspect --model python:my_pkg.models:build --spec 'LoHa(r=4, targets=["conv1"])' \\
        --graph conv1 --out conv1.png --dot graph.dot

An adapter file (kohya/LyCORIS, diffusers) is described first: its format, the parts it holds for each
model of a pipeline, method, ranks, alphas and module names; without --model that is all. The model is
built (random weights: only its structure matters), compiled with the spec or adapter, and captured once with a small example input built from its config, because the cost
model chooses each layer's evaluation order for a captured graph. Then the report table is printed.

`example_inputs` (adapt_compiler/example_inputs.py) builds the input; models come from `commands/_models.py`.
"""

from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from ..example_inputs import example_inputs
from ._models import MODEL_HELP, load_model


# example inputs: adapt_compiler/example_inputs.py (`example_inputs`, re-exported here)


# -- specs -------------------------------------------------------------------------------------
def parse_spec(text: str):
    """A spec from a Python expression over the method specs: `LoRA(r=8, targets=["q_proj"])`,
    or a dict of them for several named adapters. Only the spec classes are in scope."""
    import adapt_compiler as ac

    names = {m.spec_type.__name__: m.spec_type for m in ac.METHODS.values()}
    if "bone" in ac.METHODS:
        names["MiSS"] = ac.METHODS["bone"].spec_type
    scope = {"__builtins__": {"True": True, "False": False, "None": None, "dict": dict, "list": list,
                              "range": range, "tuple": tuple}, **names}
    try:
        spec = eval(compile(text, "<--spec>", "eval"), scope)  # noqa: S307 - the user's own command line
    except NameError as err:
        raise AdapterError(f"--spec: {err}; available specs: {', '.join(sorted(names))}.") from err
    except SyntaxError as err:
        raise AdapterError(f"--spec: not a Python expression ({err.msg}): {text!r}.") from err
    except TypeError as err:
        raise AdapterError(f"--spec: {err}.") from err
    return spec


# -- the command -------------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("inspect", help="show which layers a spec adapts, its parameters and the chosen lowering",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", help=MODEL_HELP + " (optional with --adapter FILE: the file alone is described)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="a PEFT adapter directory, or a kohya/LyCORIS or diffusers .safetensors file")
    what.add_argument("--spec", help="a Python expression, e.g. 'LoRA(r=8, targets=[\"q_proj\"])' or a dict of them")
    p.add_argument("--unmatched", action="store_true", help="also list layers of the targeted kinds left out")
    p.add_argument("--graph", metavar="LAYER", help="draw the adapted subgraph around LAYER (a name or suffix)")
    p.add_argument("--out", help="PNG path for --graph (default: LAYER.png)")
    p.add_argument("--radius", type=int, default=2, help="hops of base graph drawn around LAYER (default 2)")
    p.add_argument("--dot", metavar="FILE", help="write the whole adapted graph as Graphviz DOT")
    p.add_argument("--train", action="store_true", help="capture the training graph (default: inference)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq-len", type=int, default=8, help="example sequence length (default 8)")
    p.add_argument("--input-shape", help="example float input shape for a plain module, e.g. 1,3,32,32")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def inspect_model(model: nn.Module, spec, *, train: bool = False, batch: int = 2, seq: int = 8, input_shape=None):
    """Compile `model` with `spec` (or a PEFT dir), capture one small example, return (module, report)."""
    import adapt_compiler as ac
    from ..progress import status

    model.train(train)
    args, kwargs = example_inputs(model, batch=batch, seq=seq, input_shape=input_shape)
    with status("creating adapters"):
        m = ac.compile(model, spec, lowering="eager")
    m.train(train)
    with status("capturing the graph and choosing evaluation orders"):
        m.capture(args, kwargs)
    return m, m.report()


def run(args) -> int:
    from rich.console import Console

    from ..formats import describe, detect
    from ..graph_view import draw_layer, write_dot
    from ..progress import quiet

    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough that layer names stay on one line
        console = Console(width=max(console.width, 160))
    with quiet(args.quiet):
        if args.adapter and detect(args.adapter)[0] != "peft":
            for line in describe(args.adapter):
                console.print(line, markup=False, highlight=False)
        if args.model is None:
            if not args.adapter:
                raise AdapterError("--model is needed with --spec (the spec is applied to a model).")
            return 0
        model = load_model(args.model)
        spec = args.adapter if args.adapter else parse_spec(args.spec)
        shape = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
        m, rep = inspect_model(model, spec, train=args.train, batch=args.batch, seq=args.seq_len, input_shape=shape)
        rep.print(unmatched=args.unmatched, console=console)
        if args.graph:
            out = args.out or f"{args.graph.replace('/', '_')}.png"
            fqn = draw_layer(m, args.graph, out, radius=args.radius)
            console.print(f"wrote {out} (adapted subgraph around {fqn})")
        elif args.out:
            raise AdapterError("--out is the PNG path for --graph LAYER; pass --graph too.")
        if args.dot:
            write_dot(m, args.dot)
            console.print(f"wrote {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)")
    return 0
