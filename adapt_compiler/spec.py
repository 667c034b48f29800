"""Method specs (the base dataclass), target selection, and PEFT config <-> spec.

The concrete spec dataclasses (LoRA, LoHa, ...) live in their method's file under ``passes/``;
this module holds what they share: the targeting fields and PEFT's matching rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from .default_targets import peft_default
from .errors import AdapterError

@dataclass
class AdapterSpec:
    """Fields every method shares. Names follow PEFT (`targets` ≈ `target_modules`)."""

    method: ClassVar[str] = ""
    targets: list[str] | str | None = field(default=None, kw_only=True)
    exclude: list[str] | str | None = field(default=None, kw_only=True)
    modules_to_save: list[str] | None = field(default=None, kw_only=True)
    layers_to_transform: list[int] | int | None = field(default=None, kw_only=True)
    # evaluation order: "auto" (cost model), "activation", "weight"
    order: str = field(default="auto", kw_only=True)

    def __post_init__(self):
        if self.order not in ("auto", "activation", "weight"):
            raise AdapterError(
                f"{type(self).__name__}: order={self.order!r} is not one of 'auto', 'activation', 'weight'."
            )
        if isinstance(self.targets, (list, tuple)) and not self.targets and not self.allows_no_targets():
            raise AdapterError(f"{type(self).__name__}: targets=[] matches nothing; name at least one module.")

    def allows_no_targets(self) -> bool:
        """Whether targets=[] is meaningful (LoRA that adapts only parameters or token rows)."""
        return False

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def check_positive(spec, **values) -> None:
    """Raise a clear error for a rank/size field that must be a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(
                f"{type(spec).__name__}: {name}={value!r} must be a positive integer (e.g. {name}=8)."
            )


def check_probability(spec, **values) -> None:
    for name, value in values.items():
        if not (0.0 <= float(value) < 1.0):
            raise AdapterError(f"{type(spec).__name__}: {name}={value!r} must be in [0, 1).")


def _matches_list(keys, name: str) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _layer_index(name: str) -> int | None:
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_target(spec: AdapterSpec, name: str, targets) -> bool:
    """PEFT's `check_target_module_exists`: list = name or dotted suffix; str = regex fullmatch."""
    if spec.exclude:
        if isinstance(spec.exclude, str):
            if re.fullmatch(spec.exclude, name):
                return False
        elif _matches_list(spec.exclude, name):
            return False
    if spec.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in spec.modules_to_save):
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return True  # filtered to Linear layers (minus the output head) by the caller
        return re.fullmatch(targets, name) is not None
    if not _matches_list(targets, name):
        return False
    if spec.layers_to_transform is not None:
        wanted = spec.layers_to_transform
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        idx = _layer_index(name)
        return idx is not None and idx in wanted
    return True


def resolve_targets(spec: AdapterSpec, model: nn.Module, kind_of) -> list[str]:
    """Module FQNs the spec targets, in named_modules order.

    `kind_of(module)` returns the layer kind ("linear", "conv2d", "embedding") or None for a module
    no method can adapt. Errors name close module names when nothing matches.
    """
    targets = spec.targets
    if targets is None:  # (AdaptedModule resolves targets=None before this: targeting.py)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = peft_default(spec.method, model_type)
        if targets is None:
            raise AdapterError(
                f"{type(spec).__name__}: targets=None and PEFT lists no default for model type {model_type!r}; "
                f"pass targets=[...] (module-name suffixes) or a regex."
            )
    names = [n for n, _ in model.named_modules() if n]
    mha = {n for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)}
    chosen, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not is_target(spec, name, targets):
            continue
        kind = kind_of(module)
        if targets == "all-linear":
            if kind != "linear" or name == _output_head(model) or name.rpartition(".")[0] in mha:
                continue  # MultiheadAttention's out_proj: its forward never runs (PEFT's adapter there is inert)
        if kind is None:
            # a regex or suffix can hit a container (e.g. "self_attn"); only leaves are errors
            if not list(module.children()):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        chosen.append(name)
    if unsupported and not chosen:
        raise AdapterError(
            f"{type(spec).__name__}: targets {targets!r} matched only layers this method cannot adapt: "
            f"{', '.join(unsupported[:5])}. Supported layers: Linear, HF Conv1D, Conv2d, Embedding."
        )
    if not chosen:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        leaves = sorted({n.split(".")[-1] for n in names})
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w.split(".")[-1], leaves, n=5, cutoff=0.4)})
        hint = f" Close module names: {', '.join(close)}." if close else f" Module names include: {', '.join(leaves[:12])}."
        raise AdapterError(f"{type(spec).__name__}: targets {targets!r} matched no module.{hint}")
    return chosen


def _output_head(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None
