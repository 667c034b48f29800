"""The package's layering: no import cycles, and no module imports a layer above its own.

Every import statement counts, including the ones inside functions (a lazy import hides a cycle,
it does not remove it). Layers, lowest first; a module may import its own layer and below:

    leaf        errors, names, counters, progress, table, default_targets
    quant       quant.*                   (quantized-layer kinds: capture, matcher, slots and merge
                                           all read them, so they sit right above the leaves)
    spec        spec
    capture     capture, example_inputs
    passes      passes.*                  (never lowering, pipeline, module)
    checkpoint  checkpoint, formats.*, compile_cache   (PEFT dirs; kohya/LyCORIS and diffusers files;
                                           compile caches saved next to a PEFT dir)
    lowering    lowering.*                (never module)
    pipeline    pipeline, report, graph_view, targeting
    integrations integrations.*       (ecosystem glue: what HF clients read from a model)
    module      module
    front       export, generation_export, api
    entry       the package itself, cli, commands.*
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import networkx as nx

import adapt_compiler

ROOT = Path(adapt_compiler.__file__).parent
PKG = "adapt_compiler"
LAYERS = [
    ("leaf", ("errors", "names", "counters", "progress", "table", "default_targets")),
    # the quantized-layer kinds (bitsandbytes, torchao): ecosystem glue, but capture (which wraps
    # the layers while exporting), the matcher and Layer (passes), the slots and merge (lowering)
    # and the AdaptedModule all read the same table, so it sits right above the leaf modules and
    # imports only them (`errors`)
    ("quant", ("quant",)),
    ("spec", ("spec",)),
    ("capture", ("capture", "example_inputs")),
    ("passes", ("passes",)),
    ("checkpoint", ("checkpoint", "formats", "compile_cache")),
    ("lowering", ("lowering",)),
    ("pipeline", ("pipeline", "report", "graph_view", "targeting")),
    ("integrations", ("integrations",)),
    ("module", ("module",)),
    ("front", ("export", "generation_export", "data_init", "api")),
    ("entry", ("", "cli", "commands")),
]


def _modules() -> dict[str, Path]:
    out = {PKG: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PKG}."):
        spec = importlib.util.find_spec(info.name)
        out[info.name] = Path(spec.origin)
    return out


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from pkg import sub` counts as importing pkg.sub)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == PKG or t.startswith(PKG + "."))
    found.discard(name)
    return found


def _layer(module: str) -> int:
    rest = module[len(PKG) + 1:] if module != PKG else ""
    head = rest.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if head in members:
            return i
    raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for target in _imports(name, path, set(modules)):
            if name.startswith(target + "."):
                continue  # a module's own package is imported before it anyway
            g.add_edge(name, target)
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_no_upward_imports():
    bad = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
           for a, b in _graph().edges if _layer(b) > _layer(a)]
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import is an edge like any other (else the test could not fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..module import AdaptedModule\n")
    assert _imports(f"{PKG}.passes.m", src, {f"{PKG}.module"}) == {f"{PKG}.module"}
