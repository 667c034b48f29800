"""AdaLoRA (SVD-shaped LoRA with adaptive rank allocation), matching PEFT 0.21.2 `tuners/adalora`.

    y = x Wᵀ + b + c · (drop(x) (A⊙E)ᵀ) Bᵀ          c = alpha / (ranknum + 1e-5)   (alpha ≤ 0: r / …)

A (r, d_in) ≈ right singular vectors, E (r, 1) singular values (zero at init, so y = base), B (d_out, r)
left singular vectors; r = init_r. `ranknum` is a buffer fixed at init_r (PEFT keeps the initial
rank in the scale even after pruning or a resized reload) and is never saved.

Training hooks (PEFT's AdaLoraModel / RankAllocator, replicated op for op so masks agree bit-wise):

* `update_and_allocate(step)`: EMAs of the sensitivity I = |p ⊙ ∇p| and of its uncertainty
  |I − Ī| for every A, E, B; a cubic budget schedule from Σ init_r down to target_r per layer;
  the lowest-scoring triplets (E_i, row i of A, column i of B) get E_i = 0.
* `regularization_loss()`: orth_reg_weight · mean over A, B of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F.

The allocated keep-masks are the spec's `rank_pattern` ({"<module>.lora_E": [bool] * init_r}),
saved in adapter_config.json; the checkpoint drops the pruned rows/columns and a load sizes the
layer to Σ mask, as PEFT does. Linear, HF Conv1D and Conv2d (A is (r, d_in·kh·kw)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import AdapterSpec, check_positive, check_probability
from .method import AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


@dataclass
class AdaLoRA(AdapterSpec):
    method = "adalora"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8  # PEFT's lora_alpha
    dropout: float = 0.0
    total_step: int | None = None  # required: the length of the budget schedule
    tinit: int = 0  # warm-up steps at the full budget
    tfinal: int = 0  # final steps at the target budget (mask frozen)
    deltaT: int = 1  # re-allocate every deltaT steps
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5
    init: bool = True  # True: E = 0, A, B ~ N(0, 0.02); False: all randn (PEFT init_lora_weights)
    rank_pattern: dict | None = None  # {"<module fqn>.lora_E": [keep] * init_r}

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, init_r=self.init_r, target_r=self.target_r, deltaT=self.deltaT)
        check_probability(self, dropout=self.dropout)
        if not isinstance(self.total_step, int) or isinstance(self.total_step, bool) or self.total_step <= 0:
            raise AdapterError(
                f"AdaLoRA: total_step={self.total_step!r}; the rank budget schedule needs the number of "
                f"training steps, e.g. AdaLoRA(total_step=1000) (PEFT requires it too)."
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise AdapterError(
                f"AdaLoRA: tinit={self.tinit} must be < total_step - tfinal = "
                f"{self.total_step - self.tfinal}; "
                f"there would be no budgeting phase. Lower tinit/tfinal or raise total_step."
            )
        for n in ("beta1", "beta2"):
            if not 0 < getattr(self, n) < 1:
                raise AdapterError(f"AdaLoRA: {n}={getattr(self, n)!r} must be in (0, 1).")
        if self.orth_reg_weight < 0:
            raise AdapterError(f"AdaLoRA: orth_reg_weight={self.orth_reg_weight!r} must be >= 0.")
        if self.rank_pattern:
            self.rank_pattern = {_pattern_key(k): list(map(bool, v)) for k, v in self.rank_pattern.items()}


def _pattern_key(key: str) -> str:
    """'<fqn>.lora_E' whatever PEFT appended (in memory it is '<fqn>.lora_E.<adapter>')."""
    head, sep, _ = key.partition(".lora_E")
    return head + ".lora_E" if sep else key + ".lora_E"


def rank_of(spec: AdaLoRA, layer: Layer) -> int:
    """The layer's parameter rank at creation: Σ keep-mask if the spec has one (resized load), else init_r."""
    mask = (spec.rank_pattern or {}).get(f"{layer.fqn}.lora_E")
    return int(sum(mask)) if mask is not None else spec.init_r


def _scale(spec: AdaLoRA, p) -> torch.Tensor:
    # PEFT: scaling = lora_alpha if > 0 else r;  c = scaling / (ranknum + 1e-5)
    alpha = spec.alpha if spec.alpha > 0 else float(p["lora_A"].shape[0])
    return alpha / (p["ranknum"] + 1e-5)


class AdaLoRAMethod(WeightMethod):
    name = "adalora"
    peft_type = "ADALORA"
    prefix = "lora_"
    spec_type = AdaLoRA
    kinds = frozenset({"linear", "conv2d"})
    buffer_names = frozenset({"ranknum"})

    def check(self, spec: AdaLoRA, layer: Layer) -> None:
        super().check(spec, layer)
        if layer.kind == "conv2d" and layer.groups != 1:
            # PEFT reshapes B·(A⊙E) of (d_out, d_in·k·k) to the kernel: only groups == 1 fits
            raise AdapterShapeError(
                f"{layer.fqn}: AdaLoRA (as PEFT) supports Conv2d with groups=1 only, this one has "
                f"groups={layer.groups}; exclude it from `targets`."
            )

    def init_params(self, spec: AdaLoRA, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r, dt = rank_of(spec, layer), weight.dtype
        k = layer.kernel_numel
        a = torch.randn(r, layer.in_features * k, dtype=dt)  # (r, d_in·kh·kw)
        e = torch.randn(r, 1, dtype=dt)
        b = torch.randn(layer.out_features, r, dtype=dt)  # (d_out, r)
        if spec.init:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        # the scale divides by the *initial* rank, also for a layer loaded at a pruned size
        ranknum = torch.full((1,), float(spec.init_r), dtype=dt)
        return {"lora_A": a, "lora_E": e, "lora_B": b, "ranknum": ranknum}

    # -- evaluation ----------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        x = F.dropout(x, spec.dropout, training) if spec.dropout else x
        ae = (p["lora_A"] * p["lora_E"]).to(x.dtype)  # (r, d_in·k)
        b = p["lora_B"].to(x.dtype)  # (d_out, r)
        if layer.kind == "conv2d":
            # conv is linear in its kernel: conv(x, B·AE) = B ∗₁ₓ₁ conv(x, AE), never a dense ΔW
            h = layer.conv(x, ae.view(ae.shape[0], -1, *layer.kernel_size), groups=1)  # (N, r, H', W')
            out = F.conv2d(h, b[:, :, None, None])  # (N, d_out, H', W')
        else:
            out = F.linear(F.linear(x, ae), b)  # (…, r) then (…, d_out): T·r·(d_in + d_out)
        return out * _scale(spec, p).to(out.dtype)

    def delta_weight(self, spec, layer, p, weight):
        # ΔW = c · B (A⊙E), reshaped to the kernel for Conv2d
        dw = (p["lora_B"] @ (p["lora_A"] * p["lora_E"])) * _scale(spec, p)
        return dw.reshape(weight.shape)

    def weight_side_ok(self, spec, training):
        return not (training and spec.dropout)

    def cost(self, spec, layer, tokens):
        r, d_out = rank_of(spec, layer), layer.out_features
        d_in = layer.in_features * layer.kernel_numel
        ae = r * d_in  # A⊙E, both orders
        act = ae + matmul_flops(tokens, d_in, r) + matmul_flops(tokens, r, d_out) + 2 * tokens * d_out
        weight = ae + matmul_flops(d_out, r, d_in) + 2 * d_out * d_in
        return {"activation": act, "weight": weight}

    # -- PEFT interop ----------------------------------------------------------------------
    def peft_key(self, param_name, layer):
        return None if param_name == "ranknum" else param_name  # PEFT: lora_A / lora_E / lora_B, no `.weight`

    def saved_tensors(self, spec, layer, params):
        # PEFT's resize_state_dict_by_rank_pattern: drop pruned ranks, only if not dropped already
        mask = (spec.rank_pattern or {}).get(f"{layer.fqn}.lora_E")
        if mask is None or params["lora_A"].shape[0] != len(mask) or all(mask):
            return params
        keep = torch.tensor(mask, dtype=torch.bool, device=params["lora_A"].device)
        return {**params, "lora_A": params["lora_A"][keep], "lora_E": params["lora_E"][keep],
                "lora_B": params["lora_B"][:, keep]}

    def to_peft_config(self, spec: AdaLoRA) -> dict:
        return {
            "init_r": spec.init_r,
            "target_r": spec.target_r,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "total_step": spec.total_step,
            "tinit": spec.tinit,
            "tfinal": spec.tfinal,
            "deltaT": spec.deltaT,
            "beta1": spec.beta1,
            "beta2": spec.beta2,
            "orth_reg_weight": spec.orth_reg_weight,
            "init_lora_weights": spec.init,
            "rank_pattern": dict(spec.rank_pattern) if spec.rank_pattern else None,
            "bias": "none",
            "fan_in_fan_out": False,
        }

    def from_peft_config(self, config: dict) -> AdaLoRA:
        if config.get("bias", "none") != "none":
            raise AdapterError("AdaLoRA checkpoint trains biases (bias != 'none'); not supported yet.")
        return AdaLoRA(
            init_r=config.get("init_r", 12),
            target_r=config.get("target_r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            total_step=config.get("total_step"),
            tinit=config.get("tinit", 0),
            tfinal=config.get("tfinal", 0),
            deltaT=config.get("deltaT", 1),
            beta1=config.get("beta1", 0.85),
            beta2=config.get("beta2", 0.85),
            orth_reg_weight=config.get("orth_reg_weight", 0.5),
            init=bool(config.get("init_lora_weights", True)),
            rank_pattern=config.get("rank_pattern") or None,
        )

    # -- training hooks --------------------------------------------------------------------
    def regularization_loss(self, spec: AdaLoRA, slots):
        # PEFT AdaLoraModel.forward: w · mean over every A, B of ‖C − I‖_F, C_A = AAᵀ, C_B = BᵀB (r×r)
        # Same-shaped factors are stacked: one batched product and norm per shape, not two per layer
        by_shape: dict = {}
        for _, p in slots:
            by_shape.setdefault(("A", p["lora_A"].shape), []).append(p["lora_A"])
            by_shape.setdefault(("B", p["lora_B"].shape), []).append(p["lora_B"].T)
        if not by_shape:
            return None
        total, count = 0.0, 0
        for factors in by_shape.values():
            f = torch.stack(factors)  # (n, r, d): C = F Fᵀ (A Aᵀ, or Bᵀ B with F = Bᵀ)
            cov = f @ f.transpose(-2, -1)
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            total = total + torch.linalg.matrix_norm(cov - eye).sum()
            count += len(factors)
        return spec.orth_reg_weight * (total / count)

    def update_and_allocate(self, table, name: str, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate: importance EMAs, budget, mask (after backward)."""
        spec = table.specs[name]
        alloc = _allocator(table, name, spec)
        end = spec.total_step - spec.tfinal
        if step < end:
            alloc.update_importance()
            budget, mask_now = alloc.budget(step)
            if mask_now:
                table.specs[name] = spec.replace(rank_pattern=alloc.mask_to_budget(budget))
        elif step == end:  # the final allocation, then the EMAs restart (PEFT: reset_ipt)
            budget, _ = alloc.budget(step)
            table.specs[name] = spec.replace(rank_pattern=alloc.mask_to_budget(budget))
            alloc.reset()
        else:  # final fine-tuning: keep re-applying the frozen mask
            if not spec.rank_pattern:
                raise AdapterError(
                    f"update_and_allocate({step}): past total_step - tfinal = {end} but no rank was ever "
                    f"allocated; call it at every step from 0."
                )
            alloc.apply_pattern(spec.rank_pattern)


class _RankAllocator:
    """PEFT's RankAllocator over one adapter's layers (state lives on the AdaptedModule)."""

    def __init__(self, spec: AdaLoRA, layers: dict[str, dict[str, torch.Tensor]]):
        self.spec = spec
        self.layers = layers  # fqn -> {"lora_A", "lora_E", "lora_B"} live parameters
        self.init_bgt = sum(p["lora_A"].shape[0] for p in layers.values())
        self.target_bgt = spec.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict = {}  # (fqn, name) -> Ī
        self.avg_unc: dict = {}  # (fqn, name) -> Ū

    def budget(self, step: int) -> tuple[int, bool]:
        s = self.spec
        if step <= s.tinit:  # warm-up: full budget
            return self.init_bgt, False
        if step > s.total_step - s.tfinal:  # final fine-tuning: target budget
            return self.target_bgt, True
        # cubic decay: b(t) = (b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T
        mul = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul**3) + self.target_bgt), step % s.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.spec.beta1, self.spec.beta2
        for fqn, params in self.layers.items():
            for pname, p in params.items():
                if p.grad is None:
                    raise AdapterError(
                        f"update_and_allocate: {fqn}.{pname} has no gradient; call it after loss.backward() "
                        f"(and optimizer.step()) but before optimizer.zero_grad()."
                    )
                key = (fqn, pname)
                ipt = (p * p.grad).abs().detach()  # I = |p ⊙ ∇p|
                avg = self.avg_ipt.get(key, torch.zeros_like(p))
                unc = self.avg_unc.get(key, torch.zeros_like(p))
                # same expressions as PEFT, so the EMAs (and the kthvalue threshold) match bit for bit
                avg = b1 * avg + (1 - b1) * ipt  # Ī ← β1·Ī + (1−β1)·I
                self.avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()  # Ū ← β2·Ū + (1−β2)·|I − Ī|
                self.avg_ipt[key] = avg

    def _score(self, fqn: str, pname: str) -> torch.Tensor:
        return self.avg_ipt[(fqn, pname)] * self.avg_unc[(fqn, pname)]  # S = Ī ⊙ Ū

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        triplets = {}
        for fqn in self.layers:
            s_a = torch.mean(self._score(fqn, "lora_A"), dim=1, keepdim=True)  # (r, 1): mean over d_in
            s_b = torch.mean(self._score(fqn, "lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            s_ab = torch.cat([s_a, s_b], dim=1).sum(dim=1, keepdim=False)  # (r,)
            triplets[fqn] = self._score(fqn, "lora_E").view(-1) + s_ab.view(-1)  # s_i = S_E + S̄_A + S̄_B
        k = self.init_bgt - budget
        if k <= 0:  # PEFT's kthvalue(k=0) would raise; nothing to prune
            threshold = float("-inf")
        else:
            threshold = torch.kthvalue(torch.cat(list(triplets.values())), k=k)[0].item()
        pattern = {}
        for fqn, score in triplets.items():
            pruned = score.view(-1, 1) <= threshold
            self.layers[fqn]["lora_E"].masked_fill_(pruned, 0.0)  # pruning = zeroing E only
            pattern[f"{fqn}.lora_E"] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict) -> None:
        for fqn, params in self.layers.items():
            mask = pattern.get(f"{fqn}.lora_E")
            if mask is not None:
                keep = torch.tensor(mask, dtype=torch.bool, device=params["lora_E"].device).unsqueeze(-1)
                params["lora_E"].masked_fill_(~keep, 0.0)


def _allocator(table, name: str, spec: AdaLoRA) -> _RankAllocator:
    """The adapter's allocator, kept in `table.method_state[name]`; rebuilt if its tensors changed."""
    layers = {}
    for slot in table.slots_of(name):
        p = dict(slot.adapters[name].named_parameters(recurse=False))
        layers[slot.layer.fqn] = {k: p[k] for k in ("lora_A", "lora_E", "lora_B")}
    alloc = table.method_state.get(name)
    same = alloc is not None and alloc.layers.keys() == layers.keys() and all(
        alloc.layers[f][k] is layers[f][k] for f in layers for k in layers[f]
    )
    if not same:
        alloc = table.method_state[name] = _RankAllocator(spec, layers)
    alloc.spec = spec  # hyper-parameters (the spec object is replaced when rank_pattern changes)
    return alloc


register(AdaLoRAMethod())
