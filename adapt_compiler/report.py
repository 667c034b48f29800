"""report(): what matched where, parameters added, and the evaluation order the cost model chose."""

from __future__ import annotations

from dataclasses import dataclass, field

from .passes import COUNTERS


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


@dataclass
class Report:
    rows: list[LayerRow] = field(default_factory=list)
    trainable_params: int = 0
    base_params: int = 0
    lowering: str = ""
    kernel: str = ""
    counters: dict = field(default_factory=dict)
    graph_adapters: dict = field(default_factory=dict)  # name -> (method, params)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.base_params, 1)

    def __str__(self) -> str:
        lines = [f"{'adapter':<10} {'method':<8} {'layer':<44} {'shape':<18} {'params':>9}  order"]
        for r in self.rows:
            extra = ""
            if r.flops:
                extra = "  (" + ", ".join(f"{k} {v / 1e6:.2f} MFLOP" for k, v in r.flops.items()) + f" at T={r.tokens})"
            lines.append(
                f"{r.adapter:<10} {r.method:<8} {r.fqn:<44} {str(tuple(r.weight_shape)):<18} {r.params:>9}  {r.order}{extra}"
            )
        for name, (method, n) in self.graph_adapters.items():
            lines.append(f"{name:<10} {method:<8} {'(graph-level)':<44} {'':<18} {n:>9}")
        lines.append(
            f"trainable params: {self.trainable_params:,} ({self.trainable_percent:.3f}% of {self.base_params:,} base)"
            f" | lowering: {self.lowering} | LoRA kernel: {self.kernel}"
        )
        return "\n".join(lines)

    def print(self) -> None:
        print(self)


def build_report(module) -> Report:
    from .lowering import kernel_backend

    rep = Report(lowering=module.lowering, counters=dict(COUNTERS))
    for slot in module.slots.values():
        for name, method in slot.methods.items():
            info = slot.costs.get(name)
            choice = info["choice"] if info else None
            rep.rows.append(
                LayerRow(
                    adapter=name,
                    method=method.name,
                    fqn=slot.layer.fqn,
                    kind=slot.layer.kind,
                    weight_shape=slot.layer.weight_shape,
                    params=sum(p.numel() for p in slot.adapters[name].parameters()),
                    order=slot.orders.get(name, "activation") if info else "activation (not captured yet)",
                    flops=choice.evaluated() if choice else {},
                    tokens=info["tokens_expr"] if info else "?",
                    crossover=choice.crossover if choice else None,
                )
            )
    for name, holder in module.graph_adapters.items():
        rep.graph_adapters[name] = (module.state.specs[name].method, sum(p.numel() for p in holder.parameters()))
    rep.trainable_params = sum(p.numel() for p in module.adapter_parameters())
    rep.base_params = sum(p.numel() for p in module._model.parameters())
    device = next(iter(module._frozen.values())).device if module._frozen else None
    rep.kernel = kernel_backend(device) if device is not None else "-"
    return rep
