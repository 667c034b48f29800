"""report(): what matched where, parameters added, and the evaluation order the cost model chose.

`build_report(table, lowering, graph)` reads the adapter table's slots (one per adapted layer) and
the decisions the plan recorded on the nodes of `graph` (`lowering.plan`), the module's latest
graph in its current mode. The `Report` prints as
plain text (`str(rep)`) or as a rich table (`rep.print()`, `rep.to_rich()`, `rich.print(rep)`).

"Unmatched" layers are the near misses: modules of the same class as a targeted layer (so the
method could adapt them) that no adapter targets, grouped by name pattern, each with the reason
(not in `targets`, `exclude`, `layers_to_transform`, `modules_to_save`, the output head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .counters import COUNTERS
from .lowering import kernel_backend
from .lowering.plan import decisions_of
from .passes import GraphMethod, method_for
from .passes.match import describe_layer, layer_kind, survey
from .default_targets import peft_default
from .spec import _output_head, is_target


@dataclass
class LayerRow:
    adapter: str
    method: str
    fqn: str
    kind: str
    weight_shape: tuple
    params: int
    order: str
    flops: dict  # order -> FLOPs at the captured token count
    tokens: str  # symbolic token count of the captured graph
    crossover: float | None
    at_tokens: int | None = None  # the (hinted) token count the order was chosen for
    batched_with: int = 0  # layers whose parameter-only transform runs as one call with this one's


@dataclass
class SavedRow:
    """A `modules_to_save` copy: a whole module trained (and saved) per adapter."""

    adapter: str
    fqn: str
    params: int


@dataclass
class UnmatchedRow:
    """Layers of a targeted class that an adapter does not adapt (grouped by name pattern)."""

    adapter: str
    pattern: str  # FQN with layer indices replaced by '*'
    count: int
    module_type: str
    weight_shape: tuple
    reason: str


@dataclass
class Report:
    rows: list[LayerRow] = field(default_factory=list)
    trainable_params: int = 0
    base_params: int = 0
    lowering: str = ""
    kernel: str = ""
    checks: list = field(default_factory=list)  # (graph, lowering.guard.Verdict or None) per compiled graph
    workarounds: list = field(default_factory=list)  # compiler bugs worked around in the graphs (lowering/workarounds.py)
    regions: list = field(default_factory=list)  # lowering="regional": groups of identical blocks (lowering/regional.py)
    compile_cache: str | None = None  # what ac.compile did with a compile cache next to the adapter (compile_cache.py)
    auto: list = field(default_factory=list)  # lowering="auto": per graph, when it switched from eager (lowering/auto.py)
    # what the adapters' inits changed in our frozen copy of the base, and data passes still to run
    init_notes: list = field(default_factory=list)
    gemv: list = field(default_factory=list)  # per KV-cache graph: lifted tensors, one-row layers (lowering/lifted.py, gemv.py)
    counters: dict = field(default_factory=dict)
    graph_adapters: dict = field(default_factory=dict)  # name -> (method, params)
    saved: list[SavedRow] = field(default_factory=list)
    unmatched: list[UnmatchedRow] = field(default_factory=list)
    adapters: dict = field(default_factory=dict)  # name -> (method, params of all its tensors)
    active: tuple = ()
    model_name: str = ""

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.base_params, 1)

    @property
    def adapter_params(self) -> int:
        """Parameters of all adapters (active or not): layer rows + modules_to_save + graph-level."""
        return (
            sum(r.params for r in self.rows)
            + sum(s.params for s in self.saved)
            + sum(n for _, n in self.graph_adapters.values())
        )

    # -- plain text ------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"{'adapter':<10} {'method':<8} {'layer':<44} {'shape':<18} {'params':>9}  order"]
        for r in self.rows:
            extra = ""
            if r.flops:
                t = r.at_tokens if r.at_tokens is not None else r.tokens
                extra = "  (" + ", ".join(f"{k} {v / 1e6:.2f} MFLOP" for k, v in r.flops.items()) + f" at T={t})"
            if r.batched_with:
                extra += f"  [parameter transform batched over {r.batched_with} layers]"
            lines.append(
                f"{r.adapter:<10} {r.method:<8} {r.fqn:<44} {str(tuple(r.weight_shape)):<18} {r.params:>9}  {r.order}{extra}"
            )
        for s in self.saved:
            lines.append(f"{s.adapter:<10} {'saved':<8} {s.fqn:<44} {'(modules_to_save)':<18} {s.params:>9}")
        for name, (method, n) in self.graph_adapters.items():
            lines.append(f"{name:<10} {method:<8} {'(graph-level)':<44} {'':<18} {n:>9}")
        lines.append(
            f"trainable params: {self.trainable_params:,} ({self.trainable_percent:.3f}% of {self.base_params:,} base)"
            f" | lowering: {self.lowering} | LoRA kernel: {self.kernel}"
        )
        lines += [f"compiled graph {what}: {_check_text(v)}" for what, v in self.checks]
        lines += [f"workaround: {w}" for w in self.workarounds]
        lines += [f"regional: {r}" for r in self.regions]
        lines += [self.compile_cache] if self.compile_cache else []
        lines += [f"auto {a}" for a in self.auto]
        lines += self.init_notes
        lines += [f"compiled graph {g}" for g in self.gemv]
        return "\n".join(lines)

    # -- rich -------------------------------------------------------------------------------------
    def to_rich(self, unmatched: bool = False):
        """A rich renderable: the layer table, totals, and (optionally) the unmatched layers."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        several = len(self.adapters) > 1
        table = Table(
            title=f"adapt_compiler: {self.model_name}" if self.model_name else "adapt_compiler",
            caption="T = tokens per call at capture (batch × seq, or batch × pixels); "
            "T* = where the two orders cost the same; params ×n = the parameter-only transform "
            "runs once for n layers",
            show_footer=True,
            header_style="bold",
        )
        if several:
            table.add_column("adapter", footer="")
        table.add_column("method", footer="")
        table.add_column("layer", footer="total", overflow="fold")
        table.add_column("shape", footer="")
        table.add_column("params", justify="right", footer=f"{self.adapter_params:,}")
        table.add_column("order", footer="")
        table.add_column("FLOPs compared", footer="")
        table.add_column("T*", justify="right", footer="")
        for r in self.rows:
            order = f"{r.order} (params ×{r.batched_with})" if r.batched_with else r.order
            cells = [r.method, r.fqn, _shape(r.weight_shape), f"{r.params:,}", order, _flops_text(r), _crossover(r)]
            table.add_row(*([r.adapter] if several else []), *cells)
        for s in self.saved:
            cells = ["modules_to_save", s.fqn, "(whole module)", f"{s.params:,}", "-", "", ""]
            table.add_row(*([s.adapter] if several else []), *cells)
        for name, (method, n) in self.graph_adapters.items():
            cells = [method, "(graph-level)", "", f"{n:,}", "-", "", ""]
            table.add_row(*([name] if several else []), *cells)

        totals = Text()
        totals.append("trainable params: ", style="bold")
        totals.append(f"{self.trainable_params:,}")
        totals.append(f" ({self.trainable_percent:.3f}% of {self.base_params:,} base params)")
        if several:
            totals.append("\nadapters: " + ", ".join(
                f"{n} ({m}, {p:,}{', active' if n in self.active else ''})" for n, (m, p) in self.adapters.items()
            ))
        totals.append(f"\nlowering: {self.lowering} | LoRA kernel: {self.kernel}")
        for what, verdict in self.checks:
            style = "bold red" if verdict is not None and verdict.status == "mismatch" else None
            totals.append(f"\ncompiled graph {what}: {_check_text(verdict)}", style=style)
        for w in self.workarounds:
            totals.append(f"\nworkaround: {w}")
        if self.compile_cache:
            totals.append(f"\n{self.compile_cache}")
        for a in self.auto:
            totals.append(f"\nauto {a}")
        for note in self.init_notes:
            totals.append(f"\n{note}")
        for g in self.gemv:
            totals.append(f"\ncompiled graph {g}")
        parts = [table, totals]
        if unmatched:
            parts.append(self._unmatched_table())
        return Group(*parts)

    def _unmatched_table(self):
        from rich.table import Table

        table = Table(title="close but not targeted, or seen in the graph and not adaptable", header_style="bold")
        several = len(self.adapters) > 1
        if several:
            table.add_column("adapter")
        for col in ("layer", "count", "type", "shape", "why"):
            table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
        for u in self.unmatched:
            cells = [u.pattern, str(u.count), u.module_type, _shape(u.weight_shape), u.reason]
            table.add_row(*([u.adapter] if several else []), *cells)
        if not self.unmatched:
            table.add_row(*([""] if several else []), "(none: every layer of the targeted kinds is adapted)", "", "", "", "")
        return table

    def __rich__(self):
        return self.to_rich()

    def print(self, unmatched: bool = False, console=None) -> None:
        from rich.console import Console

        if console is None:
            console = Console()
            if not console.is_terminal:  # a pipe or a log: wide enough that layer names stay on one line
                console = Console(width=max(console.width, 160))
        console.print(self.to_rich(unmatched=unmatched))


def _check_text(verdict) -> str:
    """The guard's verdict on one compiled graph (lowering/guard.py)."""
    if verdict is None:
        return "not run yet (checked against eager on its first call)"
    if verdict.status == "reused":
        return (f"guard: verdict reused from {verdict.source} (this compiled code passed the check against eager "
                f"on this graph when the cache was saved: {verdict.compared} tensors, worst relative error "
                f"{verdict.worst:.1e}; every compile of it came from that cache)")
    if verdict.status == "passed" and verdict.note:
        return (f"checked against eager: {verdict.compared} tensors agree (worst relative error {verdict.worst:.1e}); "
                f"{verdict.note}")
    if verdict.status == "passed":
        classes = f", {verdict.shape_classes} shape classes" if verdict.shape_classes > 1 else ""
        return (f"checked against eager: {verdict.compared} tensors agree (worst relative error {verdict.worst:.1e}"
                f"{classes})")
    bad = ", ".join(w for w, _, _ in verdict.mismatches[:3])
    return (f"MISMATCH with eager on its first call ({len(verdict.mismatches)} tensors, e.g. {bad}); "
            f"now runs on the {verdict.lowering} lowering")


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape)


def _si(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _flops_text(r: LayerRow) -> str:
    if not r.flops:
        return "-"
    t = f" @T={r.at_tokens}" if r.at_tokens is not None else ""
    return " vs ".join(f"{k} {_si(v)}" for k, v in r.flops.items()) + t


def _crossover(r: LayerRow) -> str:
    return "-" if r.crossover is None else f"{r.crossover:,.0f}"


# -- building ---------------------------------------------------------------------------------
def region_lines(meta: dict | None) -> list[str]:
    """report() lines for one graph's `gm.meta["ac_regions"]` (lowering/regional.py)."""
    if not meta:
        return []
    if meta.get("whole"):
        return [f"compiled whole: {meta['whole']}"]
    return [f"group {k} compiled once for {len(paths)} block(s): {', '.join(paths)}"
            for k, paths in sorted(meta.get("groups", {}).items())]


def build_report(table, lowering: str, graph=None, checks=(), workarounds=(), regions=(),
                 compile_cache: str | None = None, auto=(), gemv=()) -> Report:
    """The report of one AdaptedModule's table; orders and FLOPs from the plan on `graph` (None:
    nothing captured yet); `checks`: (graph description, guard verdict) of each compiled graph."""
    rep = Report(lowering=lowering, counters=dict(COUNTERS), active=tuple(table.active),
                 model_name=type(table.model).__name__, checks=list(checks), workarounds=sorted(set(workarounds)),
                 regions=list(dict.fromkeys(regions)), compile_cache=compile_cache, auto=list(auto),
                 gemv=list(gemv))
    decisions = decisions_of(graph) if graph is not None else {}
    for slot in table.slots.values():
        for name, method in slot.methods.items():
            d = decisions.get((slot.layer.fqn, name))
            choice = d.choice if d else None
            rep.rows.append(
                LayerRow(
                    adapter=name,
                    method=method.name,
                    fqn=slot.layer.fqn,
                    kind=slot.layer.kind,
                    weight_shape=slot.layer.weight_shape,
                    params=sum(p.numel() for p in slot.adapters[name].parameters()),
                    order=d.order if d else "activation (not captured yet)",
                    flops=choice.evaluated() if choice else {},
                    tokens=d.tokens_expr if d else "?",
                    crossover=choice.crossover if choice else None,
                    at_tokens=choice.at_tokens if choice else None,
                    batched_with=d.batched_with if d else 0,
                )
            )
    for saved in table.saved.values():
        for name, clone in saved.copies.items():
            rep.saved.append(SavedRow(name, saved.fqn, sum(p.numel() for p in clone.parameters())))
    for name, holder in table.graph_adapters.items():
        rep.graph_adapters[name] = (table.specs[name].method, sum(p.numel() for p in holder.parameters()))
    for name, spec in table.specs.items():
        n = sum(r.params for r in rep.rows if r.adapter == name) + sum(s.params for s in rep.saved if s.adapter == name)
        n += rep.graph_adapters.get(name, ("", 0))[1]
        n += sum(p.numel() for p in table.shared[name].parameters()) if name in table.shared else 0
        rep.adapters[name] = (spec.method, n)
    rep.init_notes = init_notes(table)
    rep.unmatched = find_unmatched(table) + (graph_unmatched(table, graph) if graph is not None else [])
    rep.trainable_params = sum(p.numel() for *_, p in table.tensors() if p.requires_grad)
    rep.base_params = sum(p.numel() for p in table.model.parameters())
    device = next(iter(table.frozen.values())).device if table.frozen else None
    rep.kernel = kernel_backend(device) if device is not None else "-"
    return rep


def init_notes(table) -> list[str]:
    """One line per adapter whose init replaced base weights by a residual (PiSSA, OLoRA, CorDA: in our
    frozen copy, never the user's model) or whose data pass (EVA, CorDA) has not run yet."""
    notes = []
    for name, originals in table.base_originals.items():
        init = getattr(table.specs.get(name), "init", "?")
        notes.append(f"residual base ({name}, init={init!r}): our copy of {len(originals)} weight(s) holds W - s*B0*A0 "
                     f"({', '.join(sorted(originals)[:3])}{', ...' if len(originals) > 3 else ''}); your model keeps W")
    for name, pending in table.data_init.items():
        notes.append(f"data pass pending ({name}, init={pending.split('-')[0]!r}): see adapt_compiler/data_init/")
    return notes


def find_unmatched(table) -> list[UnmatchedRow]:
    """Per weight-method adapter: modules of a targeted class that it does not adapt, and why."""
    model = table.model
    modules = dict(model.named_modules())
    head = _output_head(model)
    out: list[UnmatchedRow] = []
    for name, spec in table.specs.items():
        method = method_for(spec)
        if isinstance(method, GraphMethod):
            continue
        adapted = {s.layer.fqn for s in table.slots_of(name)}
        classes = {type(modules[f]) for f in adapted if f in modules}
        kinds = getattr(method, "kinds", frozenset())
        targets = spec.targets
        if targets is None:
            targets = peft_default(spec.method, getattr(getattr(model, "config", None), "model_type", None)) or []
        groups: dict[tuple, list[str]] = {}
        for fqn, mod in modules.items():
            if not fqn or fqn in adapted or type(mod) not in classes or layer_kind(mod) not in kinds:
                continue
            reason = _why_not(spec, fqn, targets, head)
            shape = describe_layer(fqn, mod).weight_shape
            groups.setdefault((re.sub(r"\.\d+\.", ".*.", fqn), type(mod).__name__, shape, reason), []).append(fqn)
        for (pattern, tname, shape, reason), fqns in groups.items():
            out.append(UnmatchedRow(name, pattern, len(fqns), tname, shape, reason))
    return out


def graph_unmatched(table, graph) -> list[UnmatchedRow]:
    """What the matcher saw in the adapted graph and could not adapt (passes/match.py `survey`): weights
    read by ops that are not linear-equivalent (MoE experts' grouped matmuls, ...), and linear-equivalent
    ops whose module is not a layer a target can name. Grouped by name pattern, each with the reason."""
    modules = dict(table.model.named_modules())
    adapted = {s.layer.fqn for s in table.slots.values()} | {s.layer.weight_fqn for s in table.slots.values()}
    groups: dict[tuple, list[str]] = {}
    for c in survey(graph, lambda path: table.frozen.get(path)):
        owner = c.weight.rsplit(".", 1)[0] if c.weight and "." in c.weight else ""
        if c.weight in adapted or owner in adapted or c.weight is None:
            continue
        reason = c.reason
        if not reason:
            module = modules.get(c.module or owner)
            if module is None or layer_kind(module) is not None:
                continue  # an ordinary layer: the class-based rows above say why it is not targeted
            reason = (f"{c.op} inside {type(module).__name__}, which is not a layer module a target can name; "
                      f"LoRA can adapt its weight with target_parameters")
        t = table.frozen.get(c.weight)
        key = (re.sub(r"\.\d+\.", ".*.", c.weight), type(modules.get(owner)).__name__ if owner in modules else "-",
               tuple(t.shape) if t is not None else (), reason)
        groups.setdefault(key, []).append(c.weight)
    return [UnmatchedRow("(graph)", pattern, len(set(ws)), tname, shape, reason)
            for (pattern, tname, shape, reason), ws in groups.items()]


def _why_not(spec, fqn: str, targets, head) -> str:
    plain = spec.replace(exclude=None, modules_to_save=None, layers_to_transform=None)
    if spec.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", fqn) for m in spec.modules_to_save):
        return "in modules_to_save (trained as a whole copy)"
    if targets == "all-linear" and fqn == head:
        return "output head (all-linear leaves it out)"
    if not is_target(plain, fqn, targets):
        return f"not in targets {targets!r}" if not isinstance(targets, str) else f"does not match regex {targets!r}"
    if spec.exclude and not is_target(spec.replace(modules_to_save=None, layers_to_transform=None), fqn, targets):
        return "excluded by `exclude`"
    if spec.layers_to_transform is not None:
        return f"layer index not in layers_to_transform={spec.layers_to_transform!r}"
    return "not adapted"
