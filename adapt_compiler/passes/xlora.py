"""X-LoRA: a mixture of frozen LoRA experts gated per token by a trainable classifier, matching
PEFT 0.21.2 `tuners/xlora` (XLoraModel, XLoraClassifier, XLoraLinearLayer).

Both of PEFT's forward passes live in ONE captured graph:

    1. scaling pass   the base graph copied (only what the last hidden state needs), experts
                      scaled by the constant `scaling_pass_value` (0, the default, leaves the copy
                      a plain base pass), its last hidden state detached (PEFT: torch.no_grad)
    2. classifier     σ = softmax(classifier(h) / temperature)   (B, T, n_layers, n_experts)
                      broadcast over layers unless `layerwise_scalings`; top-k / top-k softmax
    3. adapted pass   every expert layer:  y = W x + b + Σ_e  g · α_e/r_e · B_e A_e drop_e(x ⊙ σ_e)

The expert sum is one batched computation: the experts' A's are concatenated along the rank
(R = Σ r_e rows) and their B's along the input, so a layer is two GEMMs, x·A_catᵀ then
(h ⊙ w)·B_catᵀ, where w scales each rank row by its expert's σ_e·α_e/r_e·g (x ⊙ σ commutes with A).
With expert dropout in training each expert still gets its own mask, batched over experts.

Experts live in this method's own modules (`ExpertBank`, one per adapted Linear), wired by the
rewrite in place of the Linear node, not in AdapterSlots: a slot's (x, W, b) signature has no
room for the scalings. A layer adapted by X-LoRA cannot also carry a weight-method adapter.

Layer numbering is PEFT's: the Linear layers any expert targets, in named_modules order.
Checkpoints use PEFT's intended layout (0.21.2's own save drops the classifier): the root folder
holds adapter_config.json (peft_type XLORA, `adapters`: name -> expert folder, written as an
absolute path because PEFT opens it as given) and adapter_model.safetensors with
`base_model.internal_xlora_classifier.*` keys; each expert is a PEFT LoRA folder `<root>/<name>/`.
Loading here resolves a relative or stale expert path to `<root>/<name>/`, so a moved checkpoint
still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..counters import COUNTERS
from ..errors import CheckpointError
from ..names import PEFT_PREFIX, graph_target
from ..spec import AdapterSpec, _output_head, check_positive, check_probability, resolve_targets
from .match import describe_layer, find_layer_nodes, layer_kind
from .method import AdapterError, GraphMethod
from .registry import METHODS, register

aten = torch.ops.aten


@dataclass
class XLoRA(AdapterSpec):
    method = "xlora"
    experts: dict = field(default_factory=dict)  # name -> ac.LoRA spec | PEFT LoRA directory
    hidden_size: int | None = None  # None: the model config's hidden_size
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    use_trainable_adapters: bool = False
    # the module whose output is the classifier's input; None: the input of the output head (lm_head),
    # which is PEFT's hidden_states[-1] (the final-norm output) for decoder LMs
    hidden_state_module: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.experts, dict) or not self.experts:
            raise AdapterError("XLoRA: experts must be a non-empty dict {name: ac.LoRA(...) or PEFT LoRA dir}.")
        check_positive(self, xlora_depth=self.xlora_depth, xlora_size=self.xlora_size)
        check_probability(self, xlora_dropout_p=self.xlora_dropout_p)
        if self.top_k_lora is not None:
            check_positive(self, top_k_lora=self.top_k_lora)
            if self.top_k_lora > len(self.experts):
                raise AdapterError(f"XLoRA: top_k_lora={self.top_k_lora} exceeds the {len(self.experts)} experts.")
        if self.scaling_pass_value is None:  # PEFT's set_scaling_pass_value(None): 1 / n_experts
            self.scaling_pass_value = 1 / len(self.experts)
        if self.softmax_temperature <= 0:
            raise AdapterError(f"XLoRA: softmax_temperature={self.softmax_temperature!r} must be > 0.")


def maybe_topk(scalings: torch.Tensor, spec: XLoRA) -> torch.Tensor:
    """PEFT's get_maybe_topk_scalings, over the last (expert) dim of any leading shape."""
    if spec.top_k_lora is not None:
        _, idx = torch.topk(scalings, k=spec.top_k_lora, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter(-1, idx, True)
        scalings = scalings * mask.to(scalings.dtype)
    if spec.enable_softmax_topk:
        # softmax over the kept (non-zero) experts; the others stay 0
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


class XLoRAClassifier(nn.Module):
    """PEFT's XLoraClassifier: `layers` = [Linear, ReLU, (Dropout)] * (depth-1) + Linear."""

    def __init__(self, spec: XLoRA, hidden: int, n_experts: int, n_layers: int, dtype, device):
        super().__init__()
        self.spec, self.n_experts, self.n_layers = spec, n_experts, n_layers
        out = n_experts * n_layers if spec.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = hidden
        for _ in range(spec.xlora_depth - 1):
            layers += [nn.Linear(width, spec.xlora_size), nn.ReLU()]
            if spec.xlora_dropout_p > 0:
                layers.append(nn.Dropout(spec.xlora_dropout_p))
            width = spec.xlora_size
        layers.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*layers).to(device=device, dtype=dtype)
        self.latest_scalings = None  # (B, T, n_layers, n_experts) of the last call, as PEFT keeps it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw scalings (kept for `xlora_scalings()`) -> the top-k processed ones the experts use."""
        b, t = hidden.shape[0], hidden.shape[1]
        logits = self.layers(hidden)
        if not self.spec.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)  # same scalings on every layer
        scalings = logits.reshape(b, t, self.n_layers, self.n_experts)
        if self.spec.enable_softmax:
            scalings = torch.softmax(scalings / self.spec.softmax_temperature, dim=-1)
        self.latest_scalings = scalings
        return maybe_topk(scalings, self.spec)


class ExpertBank(nn.Module):
    """All experts of one Linear layer, concatenated along the rank: lora_A (R, d_in), lora_B (d_out, R)."""

    def __init__(self, adapter: str, state, spec: XLoRA, index: int, n_layers: int, n_experts: int,
                 experts: list[tuple[int, torch.Tensor, torch.Tensor, float, float]], trainable: bool):
        super().__init__()
        self.adapter, self.state, self.spec = adapter, state, spec
        self.index, self.n_layers, self.n_experts = index, n_layers, n_experts
        self.lora_A = nn.Parameter(torch.cat([a for _, a, _, _, _ in experts], 0), requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.cat([b for _, _, b, _, _ in experts], 1), requires_grad=trainable)
        for p in (self.lora_A, self.lora_B):
            p._ac_frozen = not trainable  # set_adapter must not unfreeze the experts
        ranks = [a.shape[0] for _, a, _, _, _ in experts]
        owner = torch.cat([torch.full((r,), e, dtype=torch.long) for (e, *_), r in zip(experts, ranks)])
        local = torch.cat([torch.full((r,), i, dtype=torch.long) for i, r in enumerate(ranks)])
        g = spec.global_scaling_weight
        coef = torch.cat([torch.full((r,), s * g) for (_, _, _, s, _), r in zip(experts, ranks)])
        dev = self.lora_A.device
        self.register_buffer("owner", owner.to(dev), persistent=False)  # rank row -> global expert index
        self.register_buffer("local", local.to(dev), persistent=False)  # rank row -> expert index on this layer
        self.register_buffer("rank_coef", coef.to(dev, self.lora_A.dtype), persistent=False)  # α_e/r_e · g
        self.register_buffer("drop_p", torch.tensor([p for *_, p in experts], device=dev), persistent=False)
        self.has_dropout = any(p > 0 for *_, p in experts)  # a Python flag: no data-dependent branch in the graph
        self.__dict__["experts"] = [(e, off, r) for (e, *_), off, r in zip(experts, _offsets(ranks), ranks)]

    def expert_tensors(self, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert e's (A, B) as views into the concatenated tensors (None: e does not adapt this layer)."""
        for g, off, r in self.experts:
            if g == e:
                return self.lora_A[off:off + r], self.lora_B[:, off:off + r]
        return None

    def forward(self, x, weight, bias, sigma):
        y = F.linear(x, weight, bias)
        if self.adapter not in self.state.active:
            return y
        if sigma is None:  # the scaling pass: PEFT's dummy scalings, all `scaling_pass_value`
            full = torch.full((1, 1, self.n_layers, self.n_experts), self.spec.scaling_pass_value,
                              dtype=self.lora_A.dtype, device=x.device)
            sigma = maybe_topk(full, self.spec)
        s = sigma[:, :, self.index, :]  # (B, T, n_experts)
        w = s[..., self.owner] * self.rank_coef  # (B, T, R): σ_e · α_e/r_e · g per rank row of expert e
        xa = x.to(self.lora_A.dtype)
        p = self.drop_p
        if self.training and self.has_dropout:
            # each expert its own dropout mask: inputs (B, T, E_l, d_in), batched over the experts
            keep = torch.rand(*xa.shape[:-1], p.numel(), xa.shape[-1], device=x.device) >= p[:, None]
            xe = xa.unsqueeze(-2) * keep.to(xa.dtype) / (1 - p[:, None]).to(xa.dtype)
            h_all = F.linear(xe, self.lora_A)  # (B, T, E_l, R)
            idx = self.local.expand(*h_all.shape[:-2], 1, -1)
            h = h_all.gather(-2, idx).squeeze(-2)  # rank row r sees its own expert's dropped input
        else:
            h = F.linear(xa, self.lora_A)  # (B, T, R): every expert's A in one GEMM
        delta = F.linear(h * w, self.lora_B)  # Σ_e B_e(...) in one GEMM
        return (y + delta).to(x.dtype)


def _offsets(ranks):
    out, off = [], 0
    for r in ranks:
        out.append(off)
        off += r
    return out


class XLoRAHolder(nn.Module):
    def __init__(self, classifier: XLoRAClassifier, banks: dict[str, ExpertBank]):
        super().__init__()
        self.internal_xlora_classifier = classifier
        self.experts = nn.ModuleDict(banks)


def _key(fqn: str) -> str:
    return fqn.replace(".", "__")


# -- experts ------------------------------------------------------------------------------------
def _expert_layers(model, name: str, spec):
    """{fqn: (layer, fresh {lora_A, lora_B}, scaling)} of one expert (a LoRA spec); checkpoint.py
    copies a checkpoint's tensors into the banks afterwards (`sub_adapter_state`)."""
    lora = METHODS["lora"]
    if not isinstance(spec, lora.spec_type):
        raise CheckpointError(
            f"XLoRA expert {name!r} is a {type(spec).__name__} adapter; experts are LoRA "
            f"(ac.LoRA(...) or a PEFT LoRA directory).")
    if spec.use_dora:
        raise AdapterError(f"XLoRA expert {name!r}: DoRA experts are not supported (PEFT raises too).")
    modules = dict(model.named_modules())
    layers = {}
    for fqn in resolve_targets(spec, model, layer_kind):
        layer = describe_layer(fqn, modules[fqn])
        if layer.kind != "linear" or layer.transposed:
            raise AdapterError(
                f"XLoRA expert {name!r}: {fqn} is a {type(modules[fqn]).__name__}; X-LoRA experts here adapt "
                f"nn.Linear layers only; narrow the expert's targets."
            )
        lora.check(spec, layer)
        w = modules[fqn].weight
        params = {k: v.to(w.device) for k, v in lora.init_params(spec, layer, w.detach()).items()}
        layers[fqn] = (layer, params, lora.scaling(spec, layer))
    return layers


class XLoRAMethod(GraphMethod):
    name = "xlora"
    peft_type = "XLORA"
    prefix = "internal_xlora_classifier"
    spec_type = XLoRA
    key_prefix = "base_model."  # PEFT: base_model.internal_xlora_classifier.*

    def sub_adapters(self, spec: XLoRA) -> dict:
        for ename, src in spec.experts.items():
            if not isinstance(src, (str, Path, METHODS["lora"].spec_type)):
                raise AdapterError(f"XLoRA expert {ename!r}: expected ac.LoRA(...) or a PEFT LoRA directory, "
                                   f"got {type(src).__name__}.")
        return dict(spec.experts)

    def setup(self, table, name: str, spec: XLoRA, sub_adapters: dict):
        model = table.model
        experts = [(ename, lspec, _expert_layers(model, ename, lspec)) for ename, lspec in sub_adapters.items()]
        order = [fqn for fqn, _ in model.named_modules()]
        fqns = [f for f in order if any(f in layers for _, _, layers in experts)]  # PEFT's layer numbering
        hidden = spec.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        if not hidden:
            raise AdapterError("XLoRA: the model has no config.hidden_size; "
                               "pass hidden_size=<classifier input width>.")
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        banks = {}
        for i, fqn in enumerate(fqns):
            rows = [(e, layers[fqn][1]["lora_A"], layers[fqn][1]["lora_B"], layers[fqn][2], lspec.dropout)
                    for e, (_, lspec, layers) in enumerate(experts) if fqn in layers]
            banks[_key(fqn)] = ExpertBank(name, table.state, spec, i, len(fqns), len(experts), rows,
                                          spec.use_trainable_adapters)
        classifier = XLoRAClassifier(spec, hidden, len(experts), len(fqns), dtype, device)
        holder = XLoRAHolder(classifier, banks)
        holder.__dict__["layer_fqns"] = fqns
        holder.__dict__["expert_specs"] = [(ename, lspec, list(layers)) for ename, lspec, layers in experts]
        return holder, spec.replace(hidden_size=hidden)

    # -- the dual pass ------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, table, name: str, captured) -> None:
        holder = table.graph_adapters[name]
        spec = table.specs[name]
        graph = gm.graph
        found = find_layer_nodes(gm, set(holder.layer_fqns))
        odd = [f for f, ns in found.items() if any(n.target is not aten.linear.default for n in ns)]
        if odd:
            raise AdapterError(
                f"XLoRA: expert layers {odd[:3]} are computed as another pattern than aten.linear (e.g. x @ W.T); "
                f"X-LoRA experts adapt plain Linear ops here. Narrow the experts' targets.")
        missing = [f for f in holder.layer_fqns if f not in found]
        if missing:
            raise AdapterError(
                f"XLoRA: expert layers {missing[:3]} were not found as plain Linear ops in the captured graph "
                f"(never called with these inputs, or already adapted by another weight adapter)."
            )
        hidden = self._hidden_state(gm, table.model, spec)
        width = hidden.meta["val"].shape[-1]
        expected = holder.internal_xlora_classifier.layers[0].in_features
        if width != expected:
            raise AdapterError(
                f"XLoRA: the last hidden state is {width} wide but the classifier takes {expected} (hidden_size); "
                f"pass hidden_size={width}."
            )
        nodes = list(graph.nodes)
        last_input = max(i for i, n in enumerate(nodes) if n.op == "placeholder")
        first = nodes[last_input + 1]  # (unlifted graphs may read params before their inputs)
        needed = _ancestors(hidden)
        expert_of = {n: fqn for fqn, ns in found.items() for n in ns}
        prefix = graph_target(name)
        env: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(first):
            # 1. the scaling pass: a copy of what the last hidden state depends on
            for n in nodes:
                if n not in needed or n.op == "placeholder":
                    continue
                copy = graph.node_copy(n, lambda a: env.get(a, a))
                env[n] = copy
                if n in expert_of and spec.scaling_pass_value != 0:
                    # non-zero scaling_pass_value: experts contribute in the scaling pass too
                    x, w, b = copy.args[0], copy.args[1], copy.args[2] if len(copy.args) > 2 else None
                    bank = graph.call_module(f"{prefix}.experts.{_key(expert_of[n])}", (x, w, b, None))
                    bank.meta.update(copy.meta)
                    bank.meta["adapter"] = ((name,), self.name, expert_of[n])
                    copy.replace_all_uses_with(bank)
                    graph.erase_node(copy)
                    env[n] = bank
            # PEFT runs the scaling pass under no_grad
            h = graph.call_function(aten.detach.default, (env[hidden],))
            h.meta["val"] = hidden.meta["val"]
            # 2. the classifier: per-token (per-layer) expert scalings
            sigma = graph.call_module(f"{prefix}.internal_xlora_classifier", (h,))
            sigma.meta["adapter"] = ((name,), self.name, "internal_xlora_classifier")
        # 3. the adapted pass: each expert Linear becomes its bank, reading the scalings
        for n, fqn in expert_of.items():
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else None
            with graph.inserting_before(n):
                bank = graph.call_module(f"{prefix}.experts.{_key(fqn)}", (x, w, b, sigma))
            bank.meta.update(n.meta)
            bank.meta["adapter"] = ((name,), self.name, fqn)
            n.replace_all_uses_with(bank)
            graph.erase_node(n)
        COUNTERS["xlora_expert_layers"] += len(expert_of)

    def _hidden_state(self, gm: fx.GraphModule, model, spec: XLoRA) -> fx.Node:
        if spec.hidden_state_module is not None:
            target = spec.hidden_state_module
            hits = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                    and any(v[0] == target for v in (n.meta.get("nn_module_stack") or {}).values())]
            if not hits:
                raise AdapterError(
                    f"XLoRA: hidden_state_module={target!r} computes nothing in the captured graph.")
            return hits[-1]
        head = _output_head(model)
        nodes = find_layer_nodes(gm, {head}).get(head) if head else None
        if not nodes:
            raise AdapterError(
                "XLoRA: cannot find the last hidden state: the model has no output head (get_output_embeddings) "
                "in the graph; pass hidden_state_module=<module whose output feeds the classifier>."
            )
        node = nodes[-1].args[0]
        while node.op == "call_function" and node.target is aten.slice.Tensor:
            node = node.args[0]  # HF's logits_to_keep slice: PEFT's hidden_states[-1] is the whole sequence
        return node

    def latest_scalings(self, table, name: str):
        return table.graph_adapters[name].internal_xlora_classifier.latest_scalings

    # -- PEFT interop ---------------------------------------------------------------------------
    def state_dict(self, table, name: str) -> dict[str, torch.Tensor]:
        clf = table.graph_adapters[name].internal_xlora_classifier
        return {f"internal_xlora_classifier.{k}": v for k, v in clf.named_parameters()}

    def sub_adapter_state(self, table, name: str) -> dict:
        """Each expert as a PEFT LoRA: (spec, its layers, live views into the concatenated banks)."""
        holder = table.graph_adapters[name]
        out = {}
        for e, (ename, lspec, fqns) in enumerate(holder.expert_specs):
            tensors = {}
            for fqn in fqns:
                a, b = holder.experts[_key(fqn)].expert_tensors(e)
                tensors[f"{PEFT_PREFIX}{fqn}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{fqn}.lora_B.weight"] = b
            out[ename] = (lspec, fqns, tensors)
        return out

    def to_peft_config(self, spec: XLoRA) -> dict:
        fields = ("hidden_size", "enable_softmax", "enable_softmax_topk", "layerwise_scalings", "xlora_depth",
                  "xlora_size", "xlora_dropout_p", "use_trainable_adapters", "softmax_temperature", "top_k_lora",
                  "scaling_pass_value", "global_scaling_weight")
        config = {f: getattr(spec, f) for f in fields}
        config["adapters"] = {n: n for n in spec.experts}  # the expert folders next to this config (checkpoint.py)
        config["target_modules"] = None
        return config

    def from_peft_config(self, config: dict) -> XLoRA:
        root = Path(config.get("_ac_dir", "."))
        adapters = config.get("adapters") or {}
        if not adapters:
            raise AdapterError("XLORA config: `adapters` is empty; it must map expert names to LoRA folders.")
        experts = {}
        for ename, where in adapters.items():
            p = Path(where)
            if not p.is_absolute():
                p = root / p
            if not (p / "adapter_config.json").is_file() and (root / ename / "adapter_config.json").is_file():
                p = root / ename  # PEFT's layout: the expert's folder is named after it
            experts[ename] = str(p)
        names = ("hidden_size", "xlora_depth", "xlora_size", "xlora_dropout_p", "layerwise_scalings",
                 "enable_softmax", "enable_softmax_topk", "softmax_temperature", "top_k_lora",
                 "scaling_pass_value", "global_scaling_weight", "use_trainable_adapters")
        return XLoRA(experts=experts, **{k: config[k] for k in names if k in config})


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


register(XLoRAMethod())
