"""`adapt-compiler` command: demo, inspect, export, bench. Each subcommand lives in `commands/<name>.py`
and exposes `add_parser(subparsers)` and `run(args) -> int`; modules starting with `_` are shared helpers."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

from . import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt-compiler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    # torch 2.13's own export internals deep-copy pytree specs and trip this deprecation on every
    # capture; it is not about user code, and it buries the commands' output
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as err:  # noqa: BLE001 - user-facing errors are printed, not traced
        from .errors import AdapterError

        if isinstance(err, AdapterError):
            print(f"adapt-compiler {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
