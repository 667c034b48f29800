"""EVA (Explained Variance Adaptation), PEFT's init_lora_weights="eva": the math of its data pass.

EVA starts lora_A at the principal directions of each target layer's *inputs* over the user's data:

    A = the top-k right singular vectors of X (the layer's inputs, rows = tokens; incremental PCA)
    B = 0       (the adapted layer computes W at init: the base weight is unchanged)

and redistributes ranks across layers: every layer offers up to round(r·rho) components, and the
r·(number of layers) components with the largest explained-variance ratio, over all layers, are kept,
so a layer ends with a rank in [0, r·rho]. With `whiten`, A's rows are divided by √(singular value).
With `adjust_scaling_factors`, alpha is scaled by new_rank / r, so the scaling α/r stays as it was.

The PCA runs batch by batch until, for every layer, the components its current rank needs have
converged: the cosine similarity of each component with its value one batch earlier is >= tau.
Layers that receive equal inputs (q/k/v, gate/up) are computed once and share the result; the rank
distribution gives the group's computed layer the highest rank of the group.

This file holds what PEFT 0.21.2 computes (`peft/tuners/lora/eva.py`, `peft/utils/incremental_pca.py`),
written as the same sequence of torch operations so the factors agree to float rounding; the data pass
itself (running the captured graph, reading each adapted layer's input at its slot) is in
`data_init/eva.py`. Initialiser "eva" has `data=True`: until that pass runs, the adapter holds PEFT's
placeholder (A kaiming-uniform, B zero).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import AdapterError
from ._lora_init import Initialiser, peft_sub_config, register_init

# PEFT's EvaConfig fields and defaults
EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}


def eva_config_of(config: dict | None) -> dict:
    """PEFT's EvaConfig as a dict with its defaults, validated as PEFT validates it."""
    config = peft_sub_config(config, "eva_config", EVA_DEFAULTS, "EvaConfig")
    if config["rho"] < 1.0:
        raise AdapterError(f"LoRA: eva_config rho={config['rho']!r} must be >= 1.0 (the most rank a layer may get "
                           f"is r·rho).")
    if not 0.0 <= config["tau"] <= 1.0:
        raise AdapterError(f"LoRA: eva_config tau={config['tau']!r} must be between 0.0 and 1.0.")
    return config


class IncrementalPCA:
    """PEFT's IncrementalPCA (after scikit-learn's) in the configuration EVA uses: lowrank=True
    (torch.svd_lowrank, q = 2·n_components, 4 subspace iterations, seeded with 42 in a forked RNG,
    so the global random state is untouched), copy=True, partial_fit only."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed, self.niter = seed, niter
        self.components_ = None

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise AdapterError(f"EVA: {self.n_components} components for inputs of {n_features} features; lower r or "
                               f"eva_config rho (PEFT fails here too).")
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        first = self.components_ is None
        if first:
            self.mean_ = self.var_ = None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
        col_mean, col_var, n_total = _incremental_mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= col_mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            correction = torch.sqrt((self.n_samples_seen_.double() / n_total) * n_samples) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vt = V.mH
        # svd_flip, v-based: each component's largest-magnitude entry is positive
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])
        Vt = Vt * signs.view(-1, 1)
        self.n_samples_seen_ = n_total
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_, self.var_ = col_mean, col_var
        self.explained_variance_ratio_ = (S**2 / torch.sum(col_var * n_total))[: self.n_components]


def _incremental_mean_and_var(X, last_mean, last_variance, last_count):
    if X.shape[0] == 0:
        return last_mean, last_variance, last_count
    new_count = torch.tensor([X.shape[0]], device=X.device)
    count = last_count + new_count
    last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None \
        else last_mean * last_count
    new_sum = X.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    temp = X - new_sum / new_count
    correction = temp.sum(dim=0, dtype=torch.float64).square()
    temp.square_()
    new_unnormalized = temp.sum(dim=0, dtype=torch.float64)
    new_unnormalized -= correction / new_count
    if last_variance is None:
        return mean, new_unnormalized / count, count
    last_over_new = last_count.double() / new_count
    unnormalized = (last_variance * last_count + new_unnormalized
                    + last_over_new / count * (last_sum / last_over_new - new_sum).square())
    return mean, unnormalized / count, count


class LayerPCA:
    """One layer's running PCA and which of its components have converged (PEFT's SVDHook)."""

    def __init__(self, n_components: int, tau: float):
        self.n_components = n_components
        self.tau = tau
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @property
    def fitted(self) -> bool:
        return self.pca.components_ is not None

    def update(self, states: torch.Tensor) -> None:
        """One batch of inputs (tokens, features). Fewer tokens than components: skipped, as PEFT skips."""
        previous = self.pca.components_.clone() if self.fitted else None
        if states.size(0) < self.n_components:
            return
        self.pca.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.pca.components_
        if components.dim() == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = torch.nn.functional.cosine_similarity(components, previous) >= self.tau

    def factor(self, rank: int, whiten: bool) -> torch.Tensor:
        """lora_A (rank, d_in): the first `rank` components (whitened: divided by √singular value)."""
        if not torch.all(self.converged[:rank]):
            raise AdapterError(f"EVA: a layer was assigned rank {rank} before its components converged (PEFT raises "
                               f"this as a bug too); please report it.")
        u = self.pca.components_[:rank]
        if whiten:
            # in place on a view of the shared components, as PEFT does: with layers that share this PCA
            # (equal inputs: q/k/v), row i ends up divided by √S_i once per layer of the group whose rank
            # covers it, and every layer's A (views too) reads those rows. A PEFT quirk, kept for parity
            u /= self.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        return u


def rank_distribution(pcas: dict, layer_pca: dict, equal_to: dict, budget: int, max_components: dict) -> dict:
    """Layer -> rank: the `budget` components with the largest explained-variance ratio over all layers
    (each layer offering its first max_components); a layer that shares its inputs' PCA with others gets
    the highest rank among them. `layer_pca`: layer -> the layer whose PCA it reads."""
    ratios = {k: p.pca.explained_variance_ratio_[: max_components[k]] for k, p in pcas.items()}
    keys, values = zip(*[(k, c) for k, name in layer_pca.items() for c in ratios[name]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_pca}
    for k, k_pca in equal_to.items():
        if counts[k_pca] < counts[k]:
            counts[k_pca], counts[k] = counts[k], counts[k_pca]
    return counts


# Linear and HF Conv1D layers, the ones PEFT's EVA computes. On other LoRA layers (embeddings, convs,
# MultiheadAttention) PEFT falls back to the plain init with a warning; here `check` refuses them by name
register_init(Initialiser("eva", None, data=True, notes="data pass: ac.initialize_eva (data_init/eva.py)"))
