"""LoRA (low-rank adaptation), with rsLoRA and DoRA, matching PEFT 0.21.2 `tuners/lora`.

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ            s = alpha / r  (rsLoRA: alpha / √r)
    DoRA: y = (m / ‖W + s·B A‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b   (norm detached, eval or p=0)

Linear / HF Conv1D: A (r, d_in), B (d_out, r). Conv1d/2d/3d: A is a conv with the base kernel, stride
and padding; B is a 1×…×1 conv with the base groups. Embedding: A (r, num_embeddings), B (dim, r).
nn.MultiheadAttention: its in_proj and out_proj (passes/match.py `describe_layers`).

PEFT's LoRA options, each honoured or refused by name (`from_peft_config`, `LoRA.__post_init__`):
lora_bias (a trainable bias on B: s·(x Aᵀ Bᵀ + b_B)), target_parameters and trainable_token_indices
(passes/_lora_params.py), use_bdlora / kasa_config / velora_config (passes/_lora_variants.py),
monteclora_config (passes/_lora_monteclora.py), the initialisations (passes/_lora_init*.py). Out of scope, refused with the reason: see REFUSED below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..default_targets import moe_conversion
from ..spec import AdapterSpec, check_positive, check_probability
from . import _lora_monteclora, _lora_params, _lora_variants
from ._lora_init import INITIALISERS, initialiser_for
from ._lora_init_corda import corda_config_of
from ._lora_init_eva import eva_config_of
from ._lora_init_loftq import check_loftq_config, loftq_weights
from ._lora_init_loraga import lora_ga_config_of
from ._patterns import pattern_value
from .method import BASE_WEIGHT, AdapterError, AdapterShapeError, Layer, WeightMethod, matmul_flops
from .registry import register


# PEFT's LoRA variant options (the LoRA fields named like PEFT's config fields) that PEFT runs on Linear only
LINEAR_ONLY_VARIANTS = ("use_bdlora", "kasa_config", "velora_config", "monteclora_config")
# PEFT 0.21.2's defaults for the variant configs' fields (BdLoraConfig, KasaConfig, VeloraConfig), filled in so
# that `kasa_config={}` means "KaSA with PEFT's defaults" and not "off" (MonteCLoRA: _lora_monteclora.config_of)
VARIANT_DEFAULTS = {
    "use_bdlora": {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True},
    "kasa_config": {"beta": 1e-4, "gamma": 1e-3},
    "velora_config": {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"},
}


@dataclass
class LoRA(AdapterSpec):
    method = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = False
    # True (kaiming A, zero B) | "gaussian" | False (B not zero) | an initialiser of passes/_lora_init*.py:
    # "pissa", "pissa_niter_<k>", "olora", "mica", "eva", "corda", "lora_ga" (PEFT's init_lora_weights values)
    init: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False  # a trainable bias on lora_B (merges into the layer's bias)
    # bare nn.Parameters to adapt, e.g. MoE experts' 3-D weights: ["mlp.experts.gate_up_proj", ...]
    target_parameters: list[str] | None = None
    # embedding rows trained as themselves: [ids] (the input embedding) or {"embed_tokens": [ids]}
    trainable_token_indices: list[int] | dict | None = None
    # PEFT's variant configs, as dicts of their fields (BdLoraConfig, KasaConfig, VeloraConfig, MontecloraConfig)
    use_bdlora: dict | None = None
    kasa_config: dict | None = None
    velora_config: dict | None = None
    monteclora_config: dict | None = None
    # init="eva" / "corda" / "lora_ga": PEFT's EvaConfig / CordaConfig / LoraGAConfig fields (data_init/ runs
    # their data passes)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    loftq_config: dict = field(default_factory=dict)  # init="loftq": see _lora_init_loftq.py

    def _fill_variant_defaults(self, name: str, defaults: dict) -> None:
        value = getattr(self, name)
        if value is None:
            return
        unknown = sorted(set(value) - set(defaults))
        if unknown:
            raise AdapterError(f"LoRA: {name} has no field {unknown[0]!r} (PEFT's fields: {', '.join(defaults)}).")
        setattr(self, name, {**defaults, **value})

    def linear_only_variants(self) -> list[str]:
        """The PEFT LoRA variant options this spec sets that PEFT runs on Linear layers only."""
        return [name for name in LINEAR_ONLY_VARIANTS if getattr(self, name)]

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, r=self.r)
        check_probability(self, dropout=self.dropout)
        for name in LINEAR_ONLY_VARIANTS + ("eva_config", "corda_config"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_dict(value, name))
        for name, defaults in VARIANT_DEFAULTS.items():
            self._fill_variant_defaults(name, defaults)
        if self.monteclora_config is not None:
            self.monteclora_config = _lora_monteclora.config_of(self.monteclora_config)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterError(f"LoRA: alpha={self.alpha!r} must be a positive number (PEFT's lora_alpha).")
        if self.init not in (True, False, "gaussian", "loftq") and initialiser_for(self.init) is None:
            known = ", ".join(repr(n) for n in sorted(INITIALISERS))
            raise AdapterError(f"LoRA: init={self.init!r} (PEFT's init_lora_weights) is not supported; use True, "
                               f"False, 'gaussian', 'loftq' or one of {known}.")
        if self.init == "eva":
            self.eva_config = eva_config_of(_as_dict(self.eva_config, "eva_config"))
        if self.init == "corda":
            self.corda_config = corda_config_of(_as_dict(self.corda_config, "corda_config"))
        if self.init == "lora_ga":  # PEFT requires a LoraGAConfig; its defaults are filled in here
            self.lora_ga_config = lora_ga_config_of(_as_dict(self.lora_ga_config, "lora_ga_config"))
        elif self.lora_ga_config is not None:
            raise AdapterError(f"LoRA: lora_ga_config is only read with init='lora_ga' (got init={self.init!r}); set "
                               f"init='lora_ga' or drop it.")
        if self.init in DATA_INITS:
            combined = [n for n in ("use_dora", "target_parameters", "trainable_token_indices") if getattr(self, n)]
            combined += self.linear_only_variants()
            if combined:
                raise AdapterError(f"LoRA: init={self.init!r} with {combined[0]} is not supported: the data pass "
                                   f"initialises plain Linear LoRA factors; drop {combined[0]} or use init=True.")
        if self.init == "loftq":
            check_loftq_config(self.loftq_config)
        elif self.loftq_config:
            raise AdapterError("LoRA: loftq_config is only read with init='loftq'; set init='loftq' or drop it.")
        variants = [n for n, on in (("use_dora", self.use_dora), ("init='mica'", self.init == "mica")) if on]
        variants += self.linear_only_variants()
        if len(variants) > 1:
            raise AdapterError(f"LoRA: {' and '.join(variants)} cannot be combined (PEFT allows one LoRA variant per "
                               f"layer); pick one.")
        if self.lora_bias and self.init not in (True, False):
            raise AdapterError(f"LoRA: lora_bias=True works with init=True or False only (PEFT raises too), "
                               f"got init={self.init!r}.")
        if self.lora_bias and self.use_dora:
            raise AdapterError("LoRA: lora_bias=True is not supported with use_dora=True (PEFT raises too).")
        if self.target_parameters is not None and (isinstance(self.target_parameters, str)
                                                   or not all(isinstance(t, str) for t in self.target_parameters)):
            raise AdapterError("LoRA: target_parameters must be a list of parameter names (PEFT takes no regex here).")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)

    def allows_no_targets(self) -> bool:
        return bool(self.target_parameters or self.trainable_token_indices)


def _as_dict(value, name: str) -> dict | None:
    """A PEFT sub-config (EvaConfig, CordaConfig, ...) as the dict of its fields."""
    if value is None or isinstance(value, dict):
        return value
    value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if not isinstance(value, dict):
        raise AdapterError(f"LoRA: {name} must be a dict of PEFT's config fields, got {type(value).__name__}.")
    return value


# PEFT LoraConfig fields that are out of scope, each with why; refused by name when set
REFUSED = {
    "alora_invocation_tokens": "aLoRA switches the adapter on per token after the invocation tokens, which needs "
                               "the input ids inside every layer",
    "arrow_config": "Arrow routes between several LoRA experts per token (a mixture, not one adapter); use X-LoRA",
    "use_qalora": "QALoRA belongs to GPTQ-quantized bases (quantized bases are another issue's work)",
    "layer_replication": "it rebuilds the model's layer stack, and the compiler never modifies the user's model",
    "megatron_config": "Megatron's parallel linear layers are not captured by torch.export",
    "ensure_weight_tying": "tying the adapters of tied layers is not implemented (adapters on tied layers are "
                           "independent here; a tied weight keeps its adapter in its own module)",
}
# initialisations completed by a pass over the user's data (data_init/): until it runs, the adapter
# holds placeholders, and calling the module says which function to run
DATA_INITS = {
    "eva": "ac.initialize_eva(m, dataloader) (PEFT's initialize_lora_eva_weights)",
    "corda": "ac.preprocess_corda(m, data=batches) (PEFT's preprocess_corda)",
    "lora_ga": "ac.preprocess_loraga(m, data=batches) or ac.preprocess_loraga(m, train_step=fn(model)) (PEFT's "
               "preprocess_loraga)",
}
# the data inits that replace the base by a residual: a checkpoint's trained A, B belong to that residual, so
# loading one leaves "<init>-residual" pending (checkpoint.load_adapter_state_dict)
RESIDUAL_DATA_INITS = ("corda", "lora_ga")


def data_pass_missing(name: str, pending: str) -> str:
    """The error for calling a module whose adapter still waits for its data pass."""
    if pending == "lora_ga-residual":
        return (f"adapter {name!r} was saved with init_lora_weights='lora_ga': its A, B belong to the residual base "
                f"W - s*B0*A0 of LoRA-GA's gradient SVD over the training data, as in PEFT (which needs "
                f"preprocess_loraga before from_pretrained; without it PEFT puts these A, B over the unchanged W). Run "
                f"ac.preprocess_loraga(m, data=batches, adapter_name={name!r}) (or train_step=, or the cache_file of "
                f"the first run) with the same data, the generator seeded before ac.compile as it was before the "
                f"adapter was first made (the SVD is randomized), or pass init_data= to ac.compile. Or save the "
                f"trained adapter with path_initial_model_for_weight_conversion: plain LoRA, no residual.")
    if pending == "corda-residual":
        return (f"adapter {name!r} was saved with init_lora_weights='corda': its A, B belong to the residual base "
                f"W - s*B0*A0 of CorDA's decomposition over the calibration data, as in PEFT (which needs "
                f"preprocess_corda before from_pretrained too). Run ac.preprocess_corda(m, data=batches, "
                f"adapter_name={name!r}) with the same data, or keep corda_config['cache_file'] next to it, or pass "
                f"init_data= to ac.compile.")
    init = pending.split("-")[0]
    return (f"adapter {name!r} has init={init!r}, a data-driven initialisation whose pass has not run yet. Run "
            f"{DATA_INITS[init]} with adapter_name={name!r}, or pass init_data=<your batches> to ac.compile.")


def rank_of(spec: LoRA, layer: Layer) -> int:
    return pattern_value(spec.rank_pattern, layer.fqn, spec.r)


def scaling_of(spec: LoRA, layer: Layer) -> float:
    r = rank_of(spec, layer)
    alpha = pattern_value(spec.alpha_pattern, layer.fqn, spec.alpha)
    return alpha / math.sqrt(r) if spec.rslora else alpha / r


def _counted(fn, layer: Layer, p):
    """`fn(p)` (the adapter's delta from its tensors p) as PEFT counts it on this layer. MultiheadAttention's
    out_proj adds it twice per call (`delta_factor` 2), the second time by a `.data` update that autograd
    does not see: the value counts twice, and so does the gradient to the layer's input, but the adapter's
    own tensors get the gradient of one copy. The second copy reads them detached."""
    delta = fn(p)
    if layer.delta_factor == 1:
        return delta
    frozen = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    return delta + (layer.delta_factor - 1) * fn(frozen)


class LoRAMethod(WeightMethod):
    name = "lora"
    peft_type = "LORA"
    prefix = "lora_"
    spec_type = LoRA
    # PEFT: Linear, HF Conv1D, Conv1d/2d/3d, Embedding, nn.MultiheadAttention (as its in_proj + out_proj)
    kinds = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding", "multihead_attention"})
    # the scaling is folded into B (fold_hotswap); init is history; the compiled dropout p stays
    # (hotswap serves inference)
    hotswap_foldable = frozenset({"r", "alpha", "rslora", "rank_pattern", "alpha_pattern", "init", "dropout"})

    def resolve_spec(self, spec: LoRA, model) -> LoRA:
        """PEFT (transformers 5): `all-linear` on a MoE model whose experts are fused 3-D parameters also adapts
        them and the router through target_parameters, with rank and alpha doubled on the fused gate/up stack
        (it stands for two of the old Linear layers)."""
        if spec.targets != "all-linear":
            return spec
        fused = moe_conversion(getattr(getattr(model, "config", None), "model_type", None))
        if not fused:
            return spec
        present = {f"{m}.{p}" if m else p for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)}
        names = [n for n in fused if any(k == n or k.endswith("." + n) for k in present)]
        if not names:
            return spec
        rank, alpha = dict(spec.rank_pattern), dict(spec.alpha_pattern)
        for n in names:
            if fused[n] > 1:
                rank.setdefault(rf".*\.{re.escape(n)}", spec.r * fused[n])
                alpha.setdefault(rf".*\.{re.escape(n)}", spec.alpha * fused[n])
        extra = [n for n in names if n not in (spec.target_parameters or [])]
        return spec.replace(target_parameters=[*(spec.target_parameters or []), *extra], rank_pattern=rank,
                            alpha_pattern=alpha)

    def parameter_layers(self, spec: LoRA, model) -> dict[str, Layer]:
        return _lora_params.parameter_layers(spec, model)

    def check(self, spec: LoRA, layer: Layer) -> None:
        if layer.kind == "parameter":
            return _lora_params.check(spec, layer)
        super().check(spec, layer)
        self._check_variants(spec, layer)
        found = initialiser_for(spec.init)
        if found is not None:
            init = found[0]
            if layer.kind not in init.kinds or (layer.transposed and not init.transposed_ok):
                what = "an HF Conv1D (transposed) layer" if layer.transposed else f"a {layer.kind} layer"
                peft_does = (f"PEFT computes it on {', '.join(sorted(init.kinds))} layers and gives the others the plain "
                             f"random init with a warning" if init.data else
                             f"PEFT runs it on {', '.join(sorted(init.kinds))}"
                             f"{'' if init.transposed_ok else ', not HF Conv1D'}")
                raise AdapterShapeError(
                    f"{layer.fqn}: init={spec.init!r} (PEFT's init_lora_weights) does not support {what} ({peft_does}); "
                    f"exclude the layer from targets, or use init=True.")
        if spec.init == "lora_ga" and layer.quant is not None:
            raise AdapterShapeError(f"{layer.fqn}: init='lora_ga' over a quantized ({layer.quant.scheme}) layer is not "
                                    f"supported: LoRA-GA needs full-precision gradients of W (PEFT raises too); use "
                                    f"init=True or 'loftq', or exclude the layer from targets.")
        r = rank_of(spec, layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterShapeError(f"{layer.fqn}: LoRA r={r!r} (from rank_pattern) must be a positive integer.")
        if layer.is_conv and not layer.pointwise and any(d != 1 for d in layer.dilation) and layer.padding != "same":
            # PEFT's lora_A copies kernel, stride and padding but not the dilation: its output would not line up
            raise AdapterShapeError(
                f"{layer.fqn}: LoRA on a conv with dilation={layer.dilation}: PEFT's lora_A conv drops the dilation, "
                f"so its output size differs from the layer's (PEFT fails there too); exclude it from `targets`.")
        if layer.weight_only and spec.use_dora:
            raise AdapterShapeError(f"{layer.fqn}: DoRA on nn.MultiheadAttention is not supported (PEFT raises too); "
                                    f"use use_dora=False or exclude it from `targets`.")
        if layer.is_conv and r % layer.groups:
            raise AdapterShapeError(
                f"{layer.fqn}: LoRA rank r={r} must be divisible by the conv's groups={layer.groups}; "
                f"pick r as a multiple of {layer.groups}."
            )

    def _check_variants(self, spec: LoRA, layer: Layer) -> None:
        """PEFT runs BD-LoRA, KaSA, VeLoRA, MonteCLoRA (and MiCA) on Linear layers only, lora_bias on Linear
        and convs."""
        linear_only = spec.linear_only_variants()
        if linear_only and (layer.kind != "linear" or layer.weight_only):
            raise AdapterShapeError(f"{layer.fqn}: {linear_only[0]} works on Linear layers only (PEFT's variant is "
                                    f"Linear-only); this is a {layer.kind}. Exclude it from `targets`.")
        if spec.kasa_config and layer.transposed:
            raise AdapterShapeError(f"{layer.fqn}: kasa_config does not support HF Conv1D (fan_in_fan_out) layers "
                                    f"(PEFT raises too); exclude it from `targets`.")
        if spec.use_bdlora:
            if layer.transposed:
                raise AdapterShapeError(f"{layer.fqn}: use_bdlora on an HF Conv1D layer is not supported (PEFT's "
                                        f"BlockDiagonalLinear needs an nn.Linear); exclude it from `targets`.")
            _lora_variants.bd_check(spec, layer, rank_of(spec, layer))
        if spec.lora_bias and (layer.kind == "embedding" or layer.weight_only):
            raise AdapterShapeError(f"{layer.fqn}: lora_bias on a {'MultiheadAttention' if layer.weight_only else layer.kind}"
                                    f" layer is not supported (PEFT has no bias there); exclude it from `targets`.")

    def init_params(self, spec: LoRA, layer: Layer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        r = rank_of(spec, layer)
        dt = weight.dtype
        if layer.kind == "parameter":
            return _lora_params.init_params(spec, layer, weight, r)
        params = self._factors(spec, layer, weight, r)
        base = params.get(BASE_WEIGHT)
        if spec.kasa_config:  # KaSA: the base loses its r smallest singular components; d between A and B
            params[BASE_WEIGHT] = base = _lora_variants.kasa_base(weight, r, layer.fqn)
            params["lora_diag"] = torch.randn(r, dtype=dt)
        if spec.velora_config:
            params.update(_lora_variants.velora_init(layer, spec.velora_config, dt))
        if spec.monteclora_config:
            params.update(_lora_monteclora.init(layer.in_features, r, spec.monteclora_config, dt))
        if spec.lora_bias:
            params["lora_bias"] = torch.zeros(layer.out_features, dtype=dt)
            if spec.init is False:  # PEFT: lora_B keeps nn.Linear's / nn.Conv's default bias init
                bound = 1 / math.sqrt(params["lora_B"][0].numel())
                nn.init.uniform_(params["lora_bias"], -bound, bound)
        # DoRA's magnitude is ‖W_base + s·B₀A₀‖ (with PiSSA's residual base: ‖W‖), as PEFT computes it
        return self._with_magnitude(spec, layer, weight if base is None else base, params)

    def _factors(self, spec: LoRA, layer: Layer, weight: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
        """A and B as the spec's init makes them (and an initialiser's new base weight, if any)."""
        dt = weight.dtype
        found = initialiser_for(spec.init)
        if found is not None and not found[0].data:
            # PiSSA / OLoRA / MiCA ...: the factors (and maybe a new base weight) from W itself
            init, option = found
            got = init.init(layer, weight, r, scaling_of(spec, layer), option)
            params = {"lora_A": got.a, "lora_B": got.b}
            if got.base is not None:
                params[BASE_WEIGHT] = got.base
            return params
        if layer.kind == "embedding":
            # PEFT: A zero, B normal (the other way round from Linear)
            a = torch.zeros(r, layer.weight_shape[0], dtype=dt)
            b = torch.randn(layer.weight_shape[1], r, dtype=dt)
            if spec.init is False:
                a = torch.randn_like(a)
        else:
            if layer.is_conv:
                a = torch.empty(r, layer.in_features, *layer.kernel_size, dtype=dt)
                b = torch.empty(layer.out_features, r // layer.groups, *[1] * layer.spatial, dtype=dt)
            else:
                a = torch.empty(r, layer.in_features, dtype=dt)
                b = torch.empty(layer.out_features, r, dtype=dt)
            _lora_params.init_factors_(spec, a, b, r)
            if spec.init == "loftq":  # W − dequantize(W4) ≈ B·A (over a 4-bit base)
                a, b = (t.to(dt) for t in loftq_weights(spec, layer, weight, r))
            side = _lora_variants.bd_side(spec, layer)
            n = (spec.use_bdlora or {}).get("nblocks", 1)
            if side == "A":  # PEFT replaces A by a BlockDiagonalLinear: (r, d_in/n), kaiming (a=0)
                a = nn.init.kaiming_uniform_(torch.empty(r, layer.in_features // n, dtype=dt))
            elif side == "B":  # ... or B: (d_out, r/n), zero
                b = torch.zeros(layer.out_features, r // n, dtype=dt)
        return {"lora_A": a, "lora_B": b}

    def _with_magnitude(self, spec: LoRA, layer: Layer, weight, params: dict) -> dict:
        """DoRA: add m = ‖W + s·BA‖ (per output row) to the params, so the layer starts at W."""
        if spec.use_dora:
            with torch.no_grad():
                params["lora_magnitude_vector"] = self._weight_norm(
                    spec, layer, weight, self._dora_lora_weight(layer, params, weight.shape)
                ).to(weight.dtype)
        return params

    def buffers(self, spec: LoRA) -> frozenset[str]:
        found = initialiser_for(spec.init)
        velora = {"lora_velora_embed", "lora_velora_initialized"} if spec.velora_config else set()
        monteclora = _lora_monteclora.BUFFERS if spec.monteclora_config else set()
        return self.buffer_names | (found[0].frozen if found else frozenset()) | velora | monteclora

    def regularization_loss(self, spec: LoRA, slots):
        """KaSA's auxiliary loss (PEFT: LoraModel._get_kasa_loss), MonteCLoRA's variational loss (PEFT:
        _get_monteclora_loss, of the latest call's samples); add it to the task loss."""
        if spec.monteclora_config:
            return _lora_monteclora.variational_loss(spec.monteclora_config, [p for _, p in slots])
        if not spec.kasa_config:
            return None
        return _lora_variants.kasa_loss(spec, [(layer, p) for layer, p in slots if "lora_diag" in p])

    def before_call(self, table, name: str, training: bool) -> None:
        """MonteCLoRA: each layer's noise sample for this call, from its Python-side sampler."""
        spec = table.specs[name]
        if spec.monteclora_config:
            _lora_monteclora.before_call(table, name, spec, training)

    def runs_before_call(self, spec) -> bool:
        return bool(spec.monteclora_config)

    # -- the low-rank product ------------------------------------------------------------
    def _dense_factors(self, layer: Layer, p):
        """(A, B) as dense matrices: BD-LoRA's block-diagonal factor expanded, KaSA's d folded into B."""
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "linear" and a.shape[-1] != layer.in_features:  # BD-LoRA A
            a = _lora_variants.block_diag_dense(a, layer.in_features // a.shape[-1])
        if layer.kind == "linear" and b.shape[-1] != a.shape[0]:  # BD-LoRA B
            b = _lora_variants.block_diag_dense(b, a.shape[0] // b.shape[-1])
        if "lora_diag" in p:
            b = b * p["lora_diag"]
        return a, b

    def _lora_weight(self, layer: Layer, p, weight_shape) -> torch.Tensor:
        """B·A in the canonical weight layout (unscaled)."""
        a, b = self._dense_factors(layer, p)
        if layer.kind == "embedding":
            return (b @ a).T  # (num, dim)
        if layer.is_conv:
            if layer.pointwise:
                return (b.flatten(1) @ a.flatten(1)).reshape(weight_shape)
            # PEFT: conv(Aᵀ, B)ᵀ; exact for groups == 1 (PEFT cannot merge grouped convs, nor can we)
            return layer.conv(a.transpose(0, 1), b, stride=1, padding=0, dilation=1, groups=1).transpose(0, 1)
        return b @ a

    def _dora_lora_weight(self, layer: Layer, p, weight_shape) -> torch.Tensor:
        """B·A as DoRA's weight norm reads it. For a conv PEFT flattens the factors, (B.view(-1, r) @
        A.view(r, -1)).view(W.shape): B·A itself for groups == 1, and for a grouped conv (B holds r/g
        channels per output) the same reshape, PEFT's convention for the (detached) norm."""
        if not layer.is_conv:
            return self._lora_weight(layer, p, weight_shape)
        a, b = p["lora_A"], p["lora_B"]
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight_shape)

    def _weight_norm(self, spec, layer: Layer, weight, lora_weight) -> torch.Tensor:
        w = weight + scaling_of(spec, layer) * lora_weight
        if layer.is_conv:
            return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)  # (1, d_out, 1, …)
        if layer.kind == "embedding":
            return torch.linalg.norm(w, dim=0)  # per embedding dim
        return torch.linalg.norm(w, dim=1)

    def _low_rank(self, spec, layer: Layer, p, x, training: bool) -> torch.Tensor:
        a, b = p["lora_A"], p["lora_B"]
        if layer.kind == "embedding":
            return F.embedding(x, a.T, layer.padding_idx, layer.max_norm) @ b.T
        # MultiheadAttention's layers: PEFT merges the adapter into the weights around the call, so no dropout
        x = F.dropout(x, spec.dropout, training) if spec.dropout and not layer.weight_only else x
        x = x.to(a.dtype)  # like PEFT: the adapter math runs in the adapter's dtype
        bias = p.get("lora_bias")
        if layer.is_conv:
            # PEFT's lora_A conv copies the base kernel, stride and padding, not its dilation or groups
            h = layer.conv(x, a, dilation=1, groups=1)
            return layer.conv(h, b, bias, stride=1, padding=0, dilation=1)
        # shrink then expand: T·r·(d_in + d_out), never a d_out×d_in matrix
        h = self._shrink(spec, layer, p, x, training)
        if "lora_diag" in p:  # KaSA: B diag(d) A
            h = h * p["lora_diag"].to(h.dtype)
        if b.shape[-1] != h.shape[-1]:  # BD-LoRA: block-diagonal B
            return _lora_variants.block_diag_apply(h, b, h.shape[-1] // b.shape[-1]) + (0 if bias is None else bias)
        return F.linear(h, b, bias)

    def _shrink(self, spec, layer: Layer, p, x, training: bool) -> torch.Tensor:
        """x Aᵀ: block diagonal for BD-LoRA, through VeLoRA's compressing backward when it trains."""
        a = p["lora_A"]
        if a.shape[-1] != x.shape[-1]:  # BD-LoRA: block-diagonal A
            return _lora_variants.block_diag_apply(x, a, x.shape[-1] // a.shape[-1])
        if spec.monteclora_config and training:  # A perturbed by this call's sample
            return F.linear(x, _lora_monteclora.perturbed_a(p, spec.monteclora_config))
        cfg = spec.velora_config
        if cfg and training and torch.is_grad_enabled():
            embed = _lora_variants.velora_embed(p, x, cfg)
            return _lora_variants.VeloraLinear.apply(x, a, embed, cfg.get("num_groups", 64), cfg.get("scale", 1.0))
        return F.linear(x, a)

    # -- evaluation ----------------------------------------------------------------------
    def delta(self, spec, layer, p, x, weight, training):
        return _counted(lambda q: scaling_of(spec, layer) * self._low_rank(spec, layer, q, x, training), layer, p)

    def forward(self, spec, layer, p, x, weight, bias, training):
        if layer.kind == "parameter":  # the slot's output is the adapted parameter itself
            return _lora_params.adapted(layer, p, weight, scaling_of(spec, layer))
        out = self._forward(spec, layer, p, x, weight, bias, training)
        return out.to(weight.dtype)  # adapters in another dtype (e.g. float32 on bf16): PEFT casts back

    def _forward(self, spec, layer, p, x, weight, bias, training):
        if not spec.use_dora:
            return super().forward(spec, layer, p, x, weight, bias, training)
        s = scaling_of(spec, layer)
        norm = self._weight_norm(spec, layer, weight, self._dora_lora_weight(layer, p, weight.shape).detach()).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.kind == "embedding":
            return scale * layer.base(x, weight, None) + scale * s * self._low_rank(spec, layer, p, x, training)
        scale = scale if layer.is_conv else scale.view(1, -1)
        base_out = layer.base(x, weight, bias)
        bias_b = 0 if bias is None else layer.channel_view(bias)
        if spec.dropout and training:
            # PEFT: with active dropout the DoRA term re-runs the base op on the dropped input
            xd = F.dropout(x, spec.dropout, training)
            base_d = layer.base(xd, weight, None)
            low = self._low_rank(spec.replace(dropout=0.0), layer, p, xd, training)
            return base_out + (scale - 1) * base_d + scale * low * s
        low = self._low_rank(spec, layer, p, x, training)
        return base_out + (scale - 1) * (base_out - bias_b) + scale * low * s

    def delta_weight(self, spec, layer, p, weight):
        return _counted(lambda q: scaling_of(spec, layer) * self._lora_weight(layer, q, weight.shape), layer, p)

    def merged_weight(self, spec, layer, p, weight, bias):
        if layer.kind == "parameter":
            return _lora_params.adapted(layer, p, weight, scaling_of(spec, layer)), bias
        if "lora_bias" in p:  # b' = b + s·b_B (PEFT cannot merge it into a layer without a bias; fold_layer says so)
            extra = scaling_of(spec, layer) * p["lora_bias"]
            bias = extra if bias is None else bias + extra.to(bias.dtype)
        if layer.is_conv and layer.groups > 1:
            raise AdapterError(f"{layer.fqn}: PEFT cannot merge LoRA into a conv with groups > 1; neither can we.")
        merged = weight + self.delta_weight(spec, layer, p, weight).to(weight.dtype)
        if not spec.use_dora:
            return merged, bias
        norm = self._weight_norm(spec, layer, weight, self._dora_lora_weight(layer, p, weight.shape)).detach()
        scale = p["lora_magnitude_vector"] / norm
        if layer.is_conv:
            return merged * scale.transpose(0, 1), bias
        if layer.kind == "embedding":
            return merged * scale.view(1, -1), bias
        return merged * scale.view(-1, 1), bias

    def weight_side_ok(self, spec, training):
        # MonteCLoRA trains a per-call A' that delta_weight (the merge's B·A) does not see
        return not (training and (spec.dropout or spec.monteclora_config))  # (a weight-only layer would allow it; the plan stays simple)

    def cost(self, spec, layer, tokens):
        r = rank_of(spec, layer)
        if layer.kind != "linear":
            return {"activation": 0}
        d_in, d_out = layer.in_features, layer.out_features
        act = matmul_flops(tokens, d_in, r) + matmul_flops(tokens, r, d_out) + 2 * tokens * d_out
        weight = matmul_flops(d_out, r, d_in) + 2 * d_out * d_in
        if spec.use_dora:
            norm = matmul_flops(d_out, r, d_in) + 3 * d_out * d_in
            return {"activation": act + norm + 3 * tokens * d_out, "weight": weight + norm + d_out * d_in}
        return {"activation": act, "weight": weight}

    def scaling(self, spec: LoRA, layer: Layer) -> float:
        return scaling_of(spec, layer)

    # -- lowering hooks ----------------------------------------------------------------------
    def kernel_operands(self, spec, layer, p, training):
        # the fused kernels compute base + s·(x Aᵀ)Bᵀ: Linear / Conv1D, no DoRA, no active dropout; MonteCLoRA
        # is exactly that outside training (its sampler's tensors unused)
        unused = set(_lora_monteclora.PEFT_KEYS) if spec.monteclora_config and not training else set()
        if (layer.kind != "linear" or spec.use_dora or (training and (spec.dropout or spec.monteclora_config))
                or layer.delta_factor != 1
                or set(p) - {"lora_A", "lora_B"} - unused or p["lora_A"].shape[-1] != layer.in_features
                or p["lora_B"].shape[-1] != p["lora_A"].shape[0]):
            return None  # the kernels compute plain x Aᵀ Bᵀ: no bias, diag, blocks or VeLoRA backward
        return p["lora_A"], p["lora_B"], scaling_of(spec, layer)

    def fold_hotswap(self, old_spec, new_spec, layer, p):
        # s_old · (x Aᵀ)(B · s_new/s_old)ᵀ = s_new · (x Aᵀ) Bᵀ: one rounding, in place (same tensor)
        ratio = scaling_of(new_spec, layer) / scaling_of(old_spec, layer)
        if ratio != 1.0:
            b = p["lora_B"]
            with torch.no_grad():
                b.copy_((b.double() * ratio).to(b.dtype))

    # -- PEFT interop ----------------------------------------------------------------------
    def peft_key(self, param_name, layer):
        if layer.kind == "parameter":
            return _lora_params.peft_key(param_name, layer)
        if param_name == "lora_bias":
            return "lora_B.bias"
        if param_name == "lora_velora_initialized":
            return None  # state of this process (PEFT keeps it as a Python flag)
        if param_name in _lora_monteclora.PEFT_KEYS:
            return _lora_monteclora.PEFT_KEYS[param_name]
        if layer.kind == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}.get(param_name, param_name)
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}.get(param_name, param_name)

    def to_peft_config(self, spec: LoRA) -> dict:
        return {
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "use_rslora": spec.rslora,
            "use_dora": spec.use_dora,
            # LoftQ's result is in the saved tensors (and PEFT's "loftq" needs scipy to even load)
            "init_lora_weights": True if spec.init == "loftq" else spec.init,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
            "bias": "none",
            "lora_bias": spec.lora_bias,
            "fan_in_fan_out": False,
            "target_parameters": list(spec.target_parameters) if spec.target_parameters else None,
            "trainable_token_indices": spec.trainable_token_indices,
            "use_bdlora": spec.use_bdlora,
            "kasa_config": spec.kasa_config,
            "velora_config": spec.velora_config,
            "monteclora_config": spec.monteclora_config,
            "eva_config": spec.eva_config,
            "corda_config": spec.corda_config,
            "lora_ga_config": spec.lora_ga_config,
        }

    def from_peft_config(self, config: dict) -> LoRA:
        """A spec for a PEFT LoraConfig (as saved); every field that would change what the adapter
        computes is honoured or refused here by name, before anything is created."""
        if config.get("bias", "none") != "none":
            raise AdapterError(
                f"LoRA: bias={config['bias']!r} is not supported: it trains the base model's own biases, and the base "
                f"is frozen here; use modules_to_save for the modules whose biases should train (lora_bias=True "
                f"gives lora_B a bias of its own).")
        for name, why in REFUSED.items():
            if config.get(name):
                raise AdapterError(f"LoRA: {name} is not supported: {why}.")
        if config.get("layers_pattern") not in (None, [], ""):
            raise AdapterError(f"LoRA: layers_pattern={config['layers_pattern']!r} is not supported (layers_to_transform "
                               f"counts the first numbered module in each path); drop it.")
        init = config.get("init_lora_weights", True)
        if init == "eva":
            # EVA only chose the starting A (from activations) and the ranks (rank_pattern, saved): an EVA
            # directory holds plain LoRA tensors over the unchanged base, so it loads as one (PEFT's
            # from_pretrained does the same); starting a new EVA adapter here is what stays refused
            init = True
        return LoRA(
            r=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False),
            init=init,
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            lora_bias=bool(config.get("lora_bias", False)),
            target_parameters=list(config["target_parameters"]) if config.get("target_parameters") else None,
            trainable_token_indices=config.get("trainable_token_indices"),
            use_bdlora=config.get("use_bdlora"),
            kasa_config=config.get("kasa_config"),
            velora_config=config.get("velora_config"),
            monteclora_config=config.get("monteclora_config"),
            eva_config=config.get("eva_config"),
            corda_config=config.get("corda_config"),
            # PEFT reads lora_ga_config only for init "lora_ga"; a converted LoRA-GA directory keeps it with init True
            lora_ga_config=config.get("lora_ga_config") if init == "lora_ga" else None,
        )


register(LoRAMethod())
