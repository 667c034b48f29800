"""MonteCLoRA (LoraConfig.monteclora_config), PEFT 0.21.2's MontecloraLinearVariant, as a LoRA option.
A helper file the method registry skips; passes/lora.py calls it. Linear (and HF Conv1D) layers only.

Eval: plain LoRA; merge: plain LoRA (PEFT ignores the sampler there too). Training replaces A by

    A' = (Σ_k w_k (Aᵀ + ε_k))ᵀ      ε_k = c · z_mvn_k · chol(G)          (c = sample_scaler)
    G  = diag(clip(diag(S z_wishart S), 1e-3))                           S = diag(exp(std_prior))
    w  = softmax(chol(Σ(α)) z_dirichlet + log α − mean(log α))           α = exp(expert_weights_prior)

with std_prior (r,) and expert_weights_prior (num_samples,) trained. The noise (z_mvn, z_wishart,
z_dirichlet) is PEFT's BufferedMontecloraSampler: `buffer_size` draws made at once from torch's global
RNG, handed out one per training call, refilled when spent. Here that sampler is Python state of the
adapter (`table.method_state`); `before_call` (outside any graph) hands each layer its sample as the
adapter's `lora_monteclora_z_*` buffers (new tensors each call), which the graph reads as ordinary inputs,
so a compiled graph never draws or branches. The draws are PEFT's calls in PEFT's order, made at the
first training call instead of at construction (an inference-only adapter never holds the buffer).

PEFT writes the sample's G and w into the sampler's buffers (saved as gaussian_var_prior and
expert_weights) and reads them back in `_get_monteclora_loss`; `before_call` keeps those buffers as
PEFT leaves them, and `variational_loss` recomputes them from the current sample so that the loss
has PEFT's gradients.
"""

from __future__ import annotations

import torch
from torch.distributions.wishart import Wishart

from ..errors import AdapterError

# PEFT's MontecloraConfig fields and defaults
DEFAULTS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
            "kl_loss_weight": 1e-5, "buffer_size": 150}
STD, EXPERT = "lora_monteclora_std_prior", "lora_monteclora_expert_weights_prior"
GAUSSIAN_VAR, WEIGHTS = "lora_monteclora_gaussian_var_prior", "lora_monteclora_expert_weights"
Z_MVN, Z_WISHART, Z_DIRICHLET = "lora_monteclora_z_mvn", "lora_monteclora_z_wishart", "lora_monteclora_z_dirichlet"
# 1 while the latest call trained (its sample is in the z buffers), else 0: PEFT's loss is 0 in eval
TRAINED = "lora_monteclora_trained"
BUFFERS = frozenset({GAUSSIAN_VAR, WEIGHTS, Z_MVN, Z_WISHART, Z_DIRICHLET, TRAINED})
# our name -> PEFT's key suffix; the sample and the flag are this process's state (PEFT does not save them)
PEFT_KEYS = {STD: "lora_monteclora_sampler.std_prior", EXPERT: "lora_monteclora_sampler.expert_weights_prior",
             GAUSSIAN_VAR: "lora_monteclora_sampler.gaussian_var_prior",
             WEIGHTS: "lora_monteclora_sampler.expert_weights",
             Z_MVN: None, Z_WISHART: None, Z_DIRICHLET: None, TRAINED: None}


def config_of(value: dict) -> dict:
    """PEFT's MontecloraConfig as a full dict of its fields, checked as PEFT checks it."""
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise AdapterError(f"LoRA: monteclora_config has no field {unknown[0]!r} (PEFT's MontecloraConfig has "
                           f"{', '.join(DEFAULTS)}).")
    cfg = {**DEFAULTS, **value}
    for name in ("num_samples", "buffer_size"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] <= 0:
            raise AdapterError(f"LoRA: monteclora_config {name}={cfg[name]!r} must be a positive integer.")
    if not cfg["dirichlet_prior"] > 0:
        raise AdapterError(f"LoRA: monteclora_config dirichlet_prior={cfg['dirichlet_prior']!r} must be > 0 "
                           f"(PEFT raises too).")
    return cfg


def init(in_features: int, r: int, cfg: dict, dtype) -> dict[str, torch.Tensor]:
    """The sampler's tensors as PEFT's MontecloraSampler creates them (std_prior, then the expert prior)."""
    n = cfg["num_samples"]
    return {STD: torch.rand(r, dtype=dtype), EXPERT: torch.rand(n, dtype=dtype),
            GAUSSIAN_VAR: torch.eye(r, dtype=dtype), WEIGHTS: torch.ones(n, dtype=dtype) / n,
            Z_MVN: torch.zeros(n, in_features, r, dtype=dtype), Z_WISHART: torch.zeros(r, r, dtype=dtype),
            Z_DIRICHLET: torch.zeros(n, dtype=dtype), TRAINED: torch.zeros((), dtype=torch.bool)}


class BufferedSampler:
    """PEFT's BufferedMontecloraSampler for one layer: the same torch RNG calls in the same order."""

    def __init__(self, in_features: int, r: int, cfg: dict, dtype, device):
        self.shape, self.cfg, self.dtype, self.device = (in_features, r), cfg, dtype, device
        self.wishart = Wishart(df=r, scale_tril=torch.eye(r, device=device))
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.index = 0
        self._refill()

    def _refill(self) -> None:
        size, n = self.cfg["buffer_size"], self.cfg["num_samples"]
        with torch.no_grad():
            z_mvn = torch.randn((size, n, *self.shape), device=self.device, dtype=self.dtype)
            z_dirichlet = torch.randn((size, n), device=self.device, dtype=self.dtype)
            # PEFT: the Wishart draw in float32 (unstable in low precision), then cast
            self.buffer = [(z_mvn[i], self.wishart._bartlett_sampling(torch.Size()).to(self.dtype), z_dirichlet[i])
                           for i in range(size)]
        self.index = 0

    def get(self):
        if self.index >= self.cfg["buffer_size"]:
            self._refill()
        self.index += 1
        return self.buffer[self.index - 1]


def before_call(table, name: str, spec, training: bool) -> None:
    """Each layer's sample for this call (training only), in layer order, as PEFT's forward draws them."""
    samplers = table.method_state.setdefault(name, {})
    for slot in table.slots_of(name):
        p = slot.params(name)
        if TRAINED not in p:
            continue
        if not training:
            p[TRAINED].fill_(False)
            continue
        sampler = samplers.get(slot.layer.fqn)
        if sampler is None:
            a = p["lora_A"]
            sampler = samplers[slot.layer.fqn] = BufferedSampler(a.shape[1], a.shape[0], spec.monteclora_config,
                                                                 a.dtype, a.device)
        with torch.no_grad():
            # new tensors, not copies into the old ones: a graph still waiting for its backward (two
            # forwards, one backward) keeps the sample it used
            for key, z in zip((Z_MVN, Z_WISHART, Z_DIRICHLET), sampler.get()):
                setattr(slot.adapters[name], key, z.clone())
            p = slot.params(name)
            p[TRAINED].fill_(True)
            # the state PEFT's sampler forward leaves in its (saved) buffers
            var, weights = _variational(p, spec.monteclora_config)
            p[GAUSSIAN_VAR].copy_(var)
            p[WEIGHTS].copy_(weights)


def _variational(p, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, w) of the current sample (PEFT: wishart_ and dirichlet_reparameterization)."""
    std = torch.diag(torch.exp(p[STD]))
    var = std @ p[Z_WISHART] @ std.T
    var = torch.diag(torch.clip(var.diag(), min=1e-3))
    logits = _dirichlet_logits(torch.exp(p[EXPERT]), p[Z_DIRICHLET], cfg["num_samples"])
    return var, torch.softmax(logits, dim=-1)


def _dirichlet_logits(alpha: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    eps = 1e-6
    alpha = torch.clamp(alpha, min=eps)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / (n**2) * (1 / alpha).sum(), min=eps)
    sigma = torch.diag(diag) + eps * torch.eye(len(alpha), device=alpha.device)
    # PEFT retries with 1e-4 more on the diagonal if this fails; a positive diagonal never does
    chol = torch.linalg.cholesky(sigma.float()).to(sigma.dtype)
    return chol @ z + mu


def perturbed_a(p, cfg: dict) -> torch.Tensor:
    """A' of this training call (PEFT's MontecloraLinearVariant.forward)."""
    var, weights = _variational(p, cfg)
    chol = torch.linalg.cholesky(var.float()).to(var.dtype)  # fp32, as PEFT
    noise = cfg["sample_scaler"] * torch.nan_to_num(torch.einsum("eio,op->eip", p[Z_MVN], chol), nan=1e-3)
    a_t = p["lora_A"].T + torch.nan_to_num(noise, nan=0.0)
    averaged = torch.einsum("n,nij->ij", weights, a_t).T
    # PEFT: a sample with NaNs (the weights can get them; the noise is nan_to_num'd) leaves A as is
    return torch.where(torch.isnan(weights).any(), p["lora_A"], averaged)


def variational_loss(cfg: dict, ps: list) -> torch.Tensor | None:
    """PEFT's LoraModel._get_monteclora_loss: the mean over layers of kl_loss_weight·(KL terms) + entropy,
    0 when the latest call did not train (PEFT's samplers in eval mode)."""
    terms = []
    n = cfg["num_samples"]
    for p in ps:
        if not bool(p[TRAINED]):
            terms.append(torch.zeros((), dtype=p[STD].dtype, device=p[STD].device))
            continue
        var, weights = _variational(p, cfg)
        alpha2, alpha1 = torch.exp(p[EXPERT]), torch.tensor([cfg["dirichlet_prior"]] * n, device=p[EXPERT].device)
        gamma = lambda x: torch.lgamma(x).exp()  # noqa: E731  (PEFT's custom_gamma)
        kl1 = (torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum())) + torch.log(gamma(alpha2) / gamma(alpha1)).sum()
               + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())
        std = torch.diag(torch.exp(p[STD]))
        out = std.shape[0]
        sq = torch.diag((std @ std.T).diag())
        kl2 = 0.5 * (-torch.log(sq).trace() * out + sq.trace() * out - out**2)
        clamped = torch.clamp(var, min=1e-6)
        kl3 = n * 0.5 * (clamped.trace() - torch.log(clamped).trace() - out)
        entropy = (weights**2).sum() if cfg["use_entropy"] else 0
        terms.append(cfg["kl_loss_weight"] * (kl1 + kl2 + kl3) + entropy)
    return torch.stack(terms).mean() if terms else None
