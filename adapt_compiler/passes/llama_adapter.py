"""Llama-Adapter (PEFT's ADAPTION_PROMPT): a gated attention branch over a learnable prompt, matching
PEFT 0.21.2 `tuners/adaption_prompt` (AdaptedAttention, Llama/Mistral flavour).

Per adapted attention block, with P the prompt (1, L, D) and g the gate (1,), zero at init:

    K_P = k_proj(P), V_P = v_proj(P)              (1, L, H_kv·hd); no RoPE on the prompt keys
    S   = Q · K_Pᵀ / √hd                         Q = the block's rotated queries (B, H, T, hd)
    A   = g · softmax_fp32(S over the L prompt tokens)   a SEPARATE softmax, no mask
    out = attn_out + o_proj((A · V_P) as (B, T, H·hd))   o_proj (and its bias) applied again

Grouped-query attention: query head h reads prompt kv head h // (H / H_kv) (= PEFT's
repeat_interleave), computed by grouping the queries instead of repeating K_P/V_P.

Matching is structural. At compile time (`setup`) an attention block is a module with separate
q/k/v/o Linear children, recognised by shape (three read the hidden size D, one writes D), not by
class or child names; the top `adapter_layers` of them (named_modules order, as PEFT) get a prompt
and a gate, so the parameters exist before the first call. `targets` (PEFT's `target_modules`,
e.g. "self_attn") restricts blocks by name suffix instead. On the captured graph (`rewrite`) each
block must contain an `aten.scaled_dot_product_attention` node; its key/value inputs are walked
back (through view/transpose, RoPE and repeat_kv) to the k/v projection linears, its output forward
(through transpose/reshape) to the output projection linear, whose result gets the branch added.

Inference: in eval mode without autograd the prompt's k/v projections are constants; they are
folded when the eval graph is built and re-folded only when the prompt or the k/v weights change
(tensor version counters, checked before each call), never per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..counters import COUNTERS
from ..names import SLOTS, graph_target
from ..spec import AdapterSpec, check_positive
from .match import node_module_fqn, sdpa_nodes
from .method import AdapterError, GraphMethod
from .registry import register

aten = torch.ops.aten

# ops that only move or reshape data between a projection and SDPA (walked through when matching)
_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
}
_WALK_LIMIT = 400  # nodes visited per backward walk; a projection is a few dozen nodes up


@dataclass
class LlamaAdapter(AdapterSpec):
    method = "llama_adapter"
    adapter_len: int
    adapter_layers: int

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, adapter_len=self.adapter_len, adapter_layers=self.adapter_layers)


# -- compile time: find the attention blocks in the module tree --------------------------------
def _linear_children(module: nn.Module) -> list[nn.Linear]:
    return [c for c in module.children() if isinstance(c, nn.Linear)]


def _hidden_size(module: nn.Module) -> int | None:
    """D if `module` looks like self-attention: ≥3 Linear children read D, one writes D from q's width."""
    lins = _linear_children(module)
    if len(lins) < 4:
        return None
    for lin in lins:
        d = lin.in_features
        readers = [x for x in lins if x.in_features == d]
        writers = [o for o in lins
                   if o.out_features == d and any(o.in_features == q.out_features for q in readers if q is not o)]
        if len(readers) >= 3 and writers:
            return d
    return None


def find_attention_blocks(model: nn.Module, spec: LlamaAdapter) -> list[tuple[str, int]]:
    """(fqn, hidden size) of the blocks to adapt: the last `adapter_layers` in named_modules order."""
    targets = spec.targets
    if isinstance(targets, str):
        targets = [targets]
    found = []
    for fqn, mod in model.named_modules():
        if targets is not None and not any(fqn == t or fqn.endswith("." + t) for t in targets):
            continue
        d = _hidden_size(mod)
        if d is not None:
            found.append((fqn, d))
    what = (
        "modules with separate q/k/v/o nn.Linear children (q, k, v reading the hidden size D, "
        "the output projection writing D)"
        + (f" named {targets}" if targets is not None else "")
    )
    if not found:
        raise AdapterError(
            f"LlamaAdapter: no self-attention block fits: looked for {what}. Fused-qkv attention "
            f"(e.g. GPT-2's c_attn) is not supported; pass targets=[<attention module name>] if the "
            f"blocks exist under another layout."
        )
    if len(found) < spec.adapter_layers:
        raise AdapterError(
            f"LlamaAdapter: adapter_layers={spec.adapter_layers} but the model has only {len(found)} "
            f"attention blocks ({what}); use adapter_layers <= {len(found)}."
        )
    return found[-spec.adapter_layers:]


def _key(fqn: str) -> str:
    return fqn.replace(".", "__")


class PromptBlock(nn.Module):
    """One adapted attention block: PEFT's `adaption_prompt` and `adaption_gate`, and the branch."""

    def __init__(self, adapter: str, state, hidden: int, length: int, dtype, device):
        super().__init__()
        self.adapter, self.state = adapter, state
        # PEFT: prompt ~ N(0, 1) (the official repo's nn.Embedding init); gate 0 ("zero-init attention")
        self.adaption_prompt = nn.Parameter(torch.empty(1, length, hidden, dtype=dtype, device=device).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.register_buffer("folded_k", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("folded_v", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.__dict__["_kv_src"] = None  # (k_w, k_b, v_w, v_b): the base tensors the fold reads
        self.__dict__["_fold_key"] = None  # their (storage, version) when last folded

    def project(self, k_w, k_b, v_w, v_b):
        p = self.adaption_prompt
        return F.linear(p, k_w, k_b), F.linear(p, v_w, v_b)

    @torch.no_grad()
    def refresh_fold(self) -> None:
        """Fold K_P, V_P now if the prompt or the k/v weights changed since the last fold."""
        src = self._kv_src
        if src is None:
            return
        tensors = (self.adaption_prompt, *src)
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
        if key == self._fold_key:
            return
        k, v = self.project(*src)
        for name, val in (("folded_k", k), ("folded_v", v)):
            buf = getattr(self, name)
            if buf.shape == val.shape:
                buf.copy_(val)  # in place: compiled graphs keep reading the same buffer
            else:
                setattr(self, name, val.detach().clone())
        self.__dict__["_fold_key"] = key

    def fold_in_graph(self) -> None:
        """refresh_fold for Dynamo to trace: unconditional (its change check reads storage versions, which a
        traced graph cannot), into the same buffers."""
        src = self._kv_src
        if src is None or self.folded_k.numel() == 0:  # never folded: inference calls fold eagerly first
            return
        k, v = self.project(*src)
        self.folded_k.copy_(k)
        self.folded_v.copy_(v)

    def forward(self, attn_out, q, k_w, k_b, v_w, v_b, o_w, o_b):
        if self.adapter not in self.state.active:
            return attn_out
        if self.training or torch.is_grad_enabled():
            kp, vp = self.project(k_w, k_b, v_w, v_b)  # (1, L, H_kv·hd)
        else:
            kp, vp = self.folded_k, self.folded_v  # inference: constants folded at graph build
        b, h, t, hd = q.shape
        length = kp.shape[1]
        h_kv = kp.shape[-1] // hd
        dtype = q.dtype
        # (H_kv, L, hd), shared by the n_rep = H / H_kv query heads of each group
        k = kp.reshape(length, h_kv, hd).transpose(0, 1).unsqueeze(1).to(dtype)
        v = vp.reshape(length, h_kv, hd).transpose(0, 1).unsqueeze(1)
        qg = q.reshape(b, h_kv, h // h_kv, t, hd)  # head i -> kv head i // n_rep
        scores = torch.matmul(qg, k.transpose(-1, -2)) / math.sqrt(hd)  # (B, H_kv, n_rep, T, L)
        # PEFT: gate · softmax in fp32 over the prompt tokens only, cast back
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.matmul(probs, v).reshape(b, h, t, hd).transpose(1, 2).reshape(b, t, h * hd)
        return (attn_out + F.linear(out, o_w, o_b)).to(dtype)


# -- capture time: the attention structure around each SDPA node --------------------------------
def _linear_wb(node: fx.Node):
    """(weight, bias) argument nodes if `node` computes a Linear (plain or behind an adapter slot), else None."""
    if node.op == "call_function" and node.target is aten.linear.default:
        return node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if node.op == "call_module" and node.target.startswith(f"{SLOTS}.") and len(node.args) == 3:
        return node.args[1], node.args[2]
    return None


def _projection_into(start: fx.Node, what: str, where: str) -> fx.Node:
    """The one Linear whose output reaches `start` through reshapes / RoPE / repeat_kv."""
    found, seen, todo = [], set(), [start]
    while todo and len(seen) < _WALK_LIMIT:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if _linear_wb(node) is not None:
            found.append(node)
            continue
        if node.op != "call_function":
            continue
        # tensors only: size arguments (sym_size of some earlier activation) are not data flow
        todo.extend(n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor))
    if len(found) != 1:
        raise AdapterError(
            f"LlamaAdapter: {where}: expected exactly one Linear projection feeding the SDPA {what} input "
            f"(through view/transpose, RoPE, repeat_kv), found {len(found)}. Fused or unusual attention "
            f"layouts are not supported."
        )
    return found[0]


def _output_projection(sdpa: fx.Node, where: str) -> fx.Node:
    """The Linear that consumes SDPA's output after transpose/reshape (the block's o_proj)."""
    node = sdpa
    for _ in range(16):
        users = list(node.users)
        lin = [u for u in users if _linear_wb(u) is not None and u.args[0] is node]
        if lin:
            return lin[0]
        nxt = [u for u in users if u.op == "call_function" and u.target in _SHAPE_OPS]
        if len(users) != 1 or not nxt:
            break
        node = nxt[0]
    raise AdapterError(
        f"LlamaAdapter: {where}: the SDPA output does not reach an output-projection Linear through "
        f"transpose/reshape; attention without an output projection is not supported."
    )


def _in_scope(node: fx.Node, fqn: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(v[0] == fqn for v in stack.values())


class LlamaAdapterMethod(GraphMethod):
    name = "llama_adapter"
    peft_type = "ADAPTION_PROMPT"
    prefix = "adaption_"
    spec_type = LlamaAdapter

    def setup(self, table, name: str, spec: LlamaAdapter, sub_adapters: dict):
        blocks = find_attention_blocks(table.model, spec)
        modules = dict(table.model.named_modules())
        holder = nn.ModuleDict()
        for fqn, hidden in blocks:
            w = _linear_children(modules[fqn])[0].weight
            # PEFT: the q_proj dtype, fp32 if quantised
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            holder[_key(fqn)] = PromptBlock(name, table.state, hidden, spec.adapter_len, dtype, w.device)
        holder.__dict__["block_fqns"] = [fqn for fqn, _ in blocks]
        return holder, spec

    def before_call(self, table, name: str, training: bool) -> None:
        # outside any compiled graph: keep the folded K_P/V_P in step with the prompt and weights
        if training or torch.is_grad_enabled():
            return
        for block in table.graph_adapters[name].values():
            block.refresh_fold()

    def runs_before_call(self, spec) -> bool:
        return True

    def before_traced_call(self, table, name: str, training: bool) -> None:
        # torch.compile(m) in inference: the fold is computed inside Dynamo's graph on every call (no graph
        # break; fullgraph=True holds), so a prompt or weight update shows in the next call
        if training or torch.is_grad_enabled():
            return
        for block in table.graph_adapters[name].values():
            block.fold_in_graph()

    def rewrite(self, gm: fx.GraphModule, table, name: str, captured) -> None:
        holder = table.graph_adapters[name]
        sdpas = sdpa_nodes(gm)
        for fqn in holder.block_fqns:
            block = holder[_key(fqn)]
            mine = [n for n in sdpas if _in_scope(n, fqn)]
            if not mine:
                raise AdapterError(
                    f"LlamaAdapter: {fqn}: no aten.scaled_dot_product_attention node inside this block in the "
                    f"captured graph. Load the model with attn_implementation='sdpa' (eager matmul+softmax "
                    f"attention is not matched)."
                )
            for sdpa in mine:
                self._splice(gm, table, name, fqn, block, sdpa)
            if not captured.training:
                block.refresh_fold()  # compile-time fold for the inference graph

    def _splice(self, gm, table, name, fqn, block, sdpa) -> None:
        q, k, v = sdpa.args[:3]
        q_val = q.meta.get("val")
        if q_val is None or q_val.dim() != 4:
            raise AdapterError(f"LlamaAdapter: {fqn}: SDPA query is not (batch, heads, tokens, head_dim).")
        k_lin = _projection_into(k, "key", fqn)
        v_lin = _projection_into(v, "value", fqn)
        o_lin = _output_projection(sdpa, fqn)
        if k_lin is v_lin:
            raise AdapterError(f"LlamaAdapter: {fqn}: keys and values come from one fused projection; "
                               f"not supported.")
        (k_w, k_b), (v_w, v_b), (o_w, o_b) = _linear_wb(k_lin), _linear_wb(v_lin), _linear_wb(o_lin)
        hidden = block.adaption_prompt.shape[-1]
        k_weight = table.frozen.get(k_w.target) if k_w.op == "get_attr" else None
        heads, hd = q_val.shape[1], q_val.shape[-1]
        fits = k_weight is not None and k_weight.shape[1] == hidden and k_weight.shape[0] % hd == 0
        if not fits or heads % (k_weight.shape[0] // hd):
            raise AdapterError(
                f"LlamaAdapter: {fqn}: the key projection feeding SDPA ({node_module_fqn(k_lin)}) does not map "
                f"the hidden size {hidden} to a whole number of {hd}-wide kv heads dividing {heads} query heads."
            )
        frozen = table.frozen
        block.__dict__["_kv_src"] = tuple(frozen[n.target] if n is not None else None
                                          for n in (k_w, k_b, v_w, v_b))
        with gm.graph.inserting_after(o_lin):
            new = gm.graph.call_module(graph_target(name, _key(fqn)), (o_lin, q, k_w, k_b, v_w, v_b, o_w, o_b))
        new.meta.update(o_lin.meta)
        new.meta["adapter"] = ((name,), self.name, fqn)
        o_lin.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        COUNTERS["llama_adapter_blocks"] += 1

    # -- PEFT interop ----------------------------------------------------------------------------
    def state_dict(self, table, name: str) -> dict[str, torch.Tensor]:
        holder = table.graph_adapters[name]
        out = {}
        for fqn in holder.block_fqns:
            block = holder[_key(fqn)]
            out[f"{fqn}.adaption_prompt"] = block.adaption_prompt
            out[f"{fqn}.adaption_gate"] = block.adaption_gate
        return out

    def to_peft_config(self, spec: LlamaAdapter) -> dict:
        # PEFT's target_modules is one name suffix; None makes PEFT pick the model type's default ("self_attn")
        targets = spec.targets
        if isinstance(targets, (list, tuple)):
            targets = targets[0] if len(targets) == 1 else None
        return {"adapter_len": spec.adapter_len, "adapter_layers": spec.adapter_layers, "target_modules": targets}

    def from_peft_config(self, config: dict) -> LlamaAdapter:
        if config.get("adapter_len") is None or config.get("adapter_layers") is None:
            raise AdapterError("ADAPTION_PROMPT config: adapter_len and adapter_layers are required.")
        return LlamaAdapter(adapter_len=config["adapter_len"], adapter_layers=config["adapter_layers"])


register(LlamaAdapterMethod())
