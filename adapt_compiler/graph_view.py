"""Pictures of the adapted graph: a networkx view, a PNG around one layer, Graphviz DOT for all of it.

    g = to_networkx(gm, expand="all")        # nodes: role "base" | "adapter" | "input" | "output" | ...
    draw_layer(m, "layers.0.self_attn.q_proj", "q_proj.png")
    write_dot(m, "graph.dot")                # `dot -Tsvg graph.dot > graph.svg`

The captured graph holds one `call_module` node per adapted layer (its AdapterSlot, tagged
`node.meta["adapter"] = (adapter_names, method, target_fqn)`). To show what the adapter computes,
`expand` traces that slot with `make_fx` on meta tensors (no memory, no real compute) into ATen ops
and splices them into the picture: ops that read an adapter tensor (or consume one that did) are
adapter nodes, the frozen layer's own op stays a base node. Layout-only ops (view, t, reshape, ...)
are elided. If a slot cannot be traced this way it is drawn as one node.

PNG rendering uses matplotlib's Agg canvas directly (no pyplot, so no global backend change).
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch
from torch import fx

from .errors import AdapterError

COLORS = {
    "base": "#cfe2f3",
    "weight": "#eeeeee",
    "adapter": "#f9cb9c",
    "adapter_param": "#f6b26b",
    "input": "#d9ead3",
    "output": "#d9ead3",
}

LEGEND = {
    "base": "base op",
    "weight": "frozen weight",
    "adapter": "adapter op",
    "adapter_param": "adapter parameter",
    "input": "input",
    "output": "output",
}

_LAYOUT_OPS = {
    "view", "_unsafe_view", "reshape", "t", "alias", "detach", "clone", "contiguous", "lift_fresh_copy",
    "expand", "_to_copy",
}


# -- which graph -------------------------------------------------------------------------------
def adapted_graph(module, variant: str = "adapted") -> fx.GraphModule:
    """The most recent captured graph of `module` (an AdaptedModule) in its current mode."""
    if isinstance(module, fx.GraphModule):
        return module
    return module.latest_graph(variant)


# -- networkx ----------------------------------------------------------------------------------
def _hint(d) -> int | str:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else str(d)


def _shape_of(val) -> str:
    if isinstance(val, torch.Tensor):
        return "×".join(str(_hint(d)) for d in val.shape) or "scalar"
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return ", ".join(_shape_of(v) for v in val)
    return ""


def _op_name(target) -> str:
    """`aten.linear.default` -> "linear"; Python callables by their name."""
    return str(getattr(target, "_opname", None) or getattr(target, "__name__", None) or target)


def _role(node: fx.Node) -> str:
    if "adapter" in node.meta:
        return "adapter"
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return "weight"
    return "base"


def _label(node: fx.Node) -> str:
    if node.op == "call_module" and "adapter" in node.meta:
        names, method, fqn = node.meta["adapter"]
        names = ",".join(names) if isinstance(names, (tuple, list)) else str(names)
        return f"{method} [{names}]\n{fqn}"
    if node.op == "get_attr":
        return ".".join(str(node.target).split(".")[-2:])
    if node.op == "call_function":
        head = _op_name(node.target)
    else:
        head = node.name
    shape = _shape_of(node.meta.get("val"))
    return f"{head}\n{shape}" if shape else head


def _is_noise(node: fx.Node) -> bool:
    """Shape bookkeeping (sym_size, runtime asserts): not worth a box in a picture."""
    if node.op != "call_function":
        return False
    return not isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)) or _op_name(node.target).startswith(
        ("sym_", "_assert")
    )


def to_networkx(gm: fx.GraphModule, expand="none") -> nx.DiGraph:
    """The graph as a DiGraph. `expand`: "none", "all", or a set of slot node names to trace open."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        if _is_noise(node):
            continue
        role = _role(node)
        g.add_node(node.name, label=_label(node), role=role, op=node.op,
                   adapter=node.meta.get("adapter"), layer=(node.meta.get("adapter") or (None, None, None))[2])
        for src in node.all_input_nodes:
            if not _is_noise(src):
                g.add_edge(src.name, node.name)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or "adapter" not in node.meta:
            continue
        if expand == "all" or (expand not in ("none", None) and node.name in expand):
            _expand_slot(g, gm, node)
    return g


def _expand_slot(g: nx.DiGraph, gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace the slot node `node` in `g` by its traced ATen ops. False if it cannot be traced."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call

    slot = gm.get_submodule(node.target)
    tensors = {**dict(slot.named_parameters()), **dict(slot.named_buffers())}
    names = list(tensors)
    outer = list(node.args) + [None] * (3 - len(node.args))
    vals = []
    for a in outer[:3]:
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        vals.append(None if v is None else torch.empty([_hint(d) for d in v.shape], dtype=v.dtype, device="meta"))
    if vals[0] is None or vals[1] is None or any(isinstance(d, str) for v in vals if v is not None for d in v.shape):
        return False
    metas = [torch.empty_like(tensors[n], device="meta") for n in names]

    # the plan's decisions for this node (not `prepared`: those are graph nodes; the slot then
    # computes its parameter transform itself)
    decided = {k: v for k, v in node.kwargs.items() if k != "prepared"}

    def run(plist, x, w, b):
        return functional_call(slot, dict(zip(names, plist)), (x, w, b), decided)

    try:
        inner = make_fx(run)(metas, vals[0], vals[1], vals[2])
    except Exception:  # noqa: BLE001 - a picture is best effort: draw the slot as one node
        return False

    prefix = node.name + "/"
    fqn = node.meta["adapter"][2]
    placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
    mapping: dict[str, str | None] = {}  # inner node name -> node name in g (None: no node)
    adapterish: set[str] = set()
    for i, ph in enumerate(placeholders):
        if i < len(names):
            pname = names[i]
            nid = prefix + pname
            short = pname.split(".")[-1]
            g.add_node(nid, label=f"{short}\n{_shape_of(metas[i])}", role="adapter_param", op="param",
                       adapter=node.meta["adapter"], layer=fqn)
            mapping[ph.name] = nid
            adapterish.add(ph.name)
        else:
            src = outer[i - len(names)]
            mapping[ph.name] = src.name if isinstance(src, fx.Node) else None
    result = None
    for n in inner.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            outs = [a for a in n.all_input_nodes]
            result = mapping.get(outs[0].name) if outs else None
            continue
        ins = [a.name for a in n.all_input_nodes]
        is_adapter = any(a in adapterish for a in ins)
        if is_adapter:
            adapterish.add(n.name)
        if n.op == "call_function" and _op_name(n.target) in _LAYOUT_OPS and ins:
            mapping[n.name] = mapping.get(ins[0])  # elide layout-only ops
            continue
        if n.op == "get_attr":  # a constant make_fx lifted
            mapping[n.name] = None
            continue
        nid = prefix + n.name
        g.add_node(nid, label=f"{_op_name(n.target)}\n{_shape_of(n.meta.get('val'))}",
                   role="adapter" if is_adapter else "base", op=n.op,
                   adapter=node.meta["adapter"] if is_adapter else None, layer=fqn)
        for a in ins:
            src = mapping.get(a)
            if src is not None:
                g.add_edge(src, nid)
        mapping[n.name] = nid
    # tensors of adapters that are not active are not read: leave them out of the picture
    g.remove_nodes_from([mapping[p.name] for p in placeholders[: len(names)] if g.out_degree(mapping[p.name]) == 0])
    if result is None:
        return False
    for user in list(g.successors(node.name)):
        g.add_edge(result, user)
    g.remove_node(node.name)
    return True


# -- one layer as a PNG ------------------------------------------------------------------------
def find_layer(gm: fx.GraphModule, layer: str) -> list[fx.Node]:
    """The adapter nodes of a layer: exact FQN, else a dotted suffix, else a substring."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and "adapter" in n.meta]
    for match in (
        lambda f: f == layer,
        lambda f: f.endswith("." + layer),
        lambda f: layer in f,
    ):
        hits = [n for n in nodes if match(n.meta["adapter"][2])]
        if hits:
            return hits
    known = sorted({n.meta["adapter"][2] for n in nodes})
    raise AdapterError(
        f"--graph {layer!r}: no adapted layer matches; adapted layers: {', '.join(known[:8])}"
        + (" ..." if len(known) > 8 else "")
    )


def layer_subgraph(gm: fx.GraphModule, layer: str, radius: int = 2) -> tuple[nx.DiGraph, str]:
    """(the adapted subgraph around `layer`, the FQN drawn): `radius` hops of base graph either side."""
    node = find_layer(gm, layer)[0]
    fqn = node.meta["adapter"][2]
    full = to_networkx(gm)
    keep = set(nx.ego_graph(full.to_undirected(as_view=True), node.name, radius=radius))
    g = full.subgraph(keep).copy()
    _expand_slot(g, gm, node)
    return g, fqn


def _generations(g: nx.DiGraph) -> dict[str, int]:
    depth: dict[str, int] = {}
    for n in nx.topological_sort(g):
        preds = list(g.predecessors(n))
        depth[n] = 1 + max((depth[p] for p in preds), default=-1)
    return depth


def render_png(g: nx.DiGraph, path, title: str = "") -> Path:
    """Draw `g` top to bottom (one row per topological generation), coloured by node role."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    depth = _generations(g)
    for n, d in depth.items():
        g.nodes[n]["gen"] = d
    pos = nx.multipartite_layout(g, subset_key="gen", align="horizontal", scale=1.0)
    rows = max(depth.values(), default=0) + 1
    widest = max((sum(1 for d in depth.values() if d == r) for r in range(rows)), default=1)
    # multipartite puts generation 0 at the bottom with align="horizontal"; flip so data flows down
    pos = {n: (x, -y) for n, (x, y) in pos.items()}
    fig = Figure(figsize=(max(6.0, 2.4 * widest), max(4.0, 1.1 * rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.set_axis_off()
    for u, v in g.edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="#666666", lw=0.8, shrinkA=14, shrinkB=14))
    for n, (x, y) in pos.items():
        data = g.nodes[n]
        ax.text(x, y, data.get("label", n), ha="center", va="center", fontsize=7, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc=COLORS.get(data.get("role"), "#ffffff"), ec="#555555", lw=0.6))
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    pad_x = 0.15 * max(1e-3, max(xs) - min(xs)) + 0.1
    pad_y = 0.08 * max(1e-3, max(ys) - min(ys)) + 0.05
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    roles = [r for r in COLORS if any(g.nodes[n].get("role") == r for n in g)]
    ax.legend(handles=[Patch(fc=COLORS[r], ec="#555555", label=LEGEND[r]) for r in roles],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def draw_layer(module, layer: str, path, radius: int = 2) -> str:
    """Write a PNG of the adapted subgraph around `layer`; returns the FQN drawn."""
    gm = adapted_graph(module)
    g, fqn = layer_subgraph(gm, layer, radius=radius)
    render_png(g, path, title=f"adapted subgraph around {fqn}")
    return fqn


# -- the whole graph as DOT --------------------------------------------------------------------
def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: nx.DiGraph, name: str = "adapted") -> str:
    """Graphviz DOT text; each expanded adapter layer becomes a cluster."""
    lines = [f"digraph {_q(name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    clusters: dict[str, list[str]] = {}
    for n, data in g.nodes(data=True):
        attrs = f"label={_q(data.get('label', n))}, fillcolor={_q(COLORS.get(data.get('role'), '#ffffff'))}"
        if data.get("role") in ("adapter", "adapter_param"):
            attrs += ", color=\"#b45f06\""
        line = f"  {_q(n)} [{attrs}];"
        if "/" in n and data.get("layer"):
            clusters.setdefault(data["layer"], []).append(line)
        else:
            lines.append(line)
    for i, (fqn, members) in enumerate(clusters.items()):
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_q(fqn)}; style=dashed; color=\"#b45f06\";")
        lines.extend("  " + m for m in members)
        lines.append("  }")
    for u, v in g.edges:
        lines.append(f"  {_q(u)} -> {_q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(module, path, expand: bool = True) -> Path:
    """Write the whole adapted graph as DOT (adapter layers traced open when `expand`)."""
    gm = adapted_graph(module)
    g = to_networkx(gm, expand="all" if expand else "none")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_dot(g))
    return path
