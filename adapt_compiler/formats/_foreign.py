"""What the single-file formats (kohya/LyCORIS, diffusers) share: reading and writing a .safetensors
file, finding which part of a file belongs to the model at hand, and turning per-module tensors into
one spec plus PEFT-keyed tensors. A helper file: the dispatcher (`formats/__init__.py`) never lists it.

A foreign file stores, per module, the adapter's tensors, its rank (in the shapes) and its alpha. Our
spec has one r / alpha plus PEFT's `rank_pattern` / `alpha_pattern` for the modules that differ, so
each module becomes a pattern entry anchored at its full path (`^down_blocks.0...to_q`, the same
spelling diffusers uses when it loads such files into PEFT).
"""

from __future__ import annotations

import collections
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import _write_temp, check_tensors
from ..errors import AdapterError, CheckpointError
from ..names import PEFT_PREFIX
from ..passes import METHODS, method_for
from ..passes.lokr import factorization
from ..passes.match import describe_layer, layer_kind
from ..spec import resolve_targets

# component names are diffusers' pipeline attribute names; a denoiser is a "unet" or a "transformer"
DENOISERS = ("unet", "transformer")


@dataclass
class ModuleWeights:
    """One module's adapter as a foreign file stores it, with our (PEFT's) parameter names."""

    name: str  # the file's name for the module (errors and listings)
    method: str  # registry name: "lora" | "loha" | "lokr"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # lora_A, hada_w1_a, lokr_w1, ...
    alpha: float | None = None  # None: the file has none (scale 1, the kohya / diffusers convention)
    fqn: str | None = None  # the model's module path, once resolved

    def add(self, method: str | None, pname: str, t: torch.Tensor, what: str) -> None:
        """Record one tensor of the file (`method`: what its suffix says, None for alpha/scale;
        `what`: the file and module, for the error)."""
        if method is not None:
            if self.method and self.method != method:
                raise CheckpointError(f"{what} holds both {self.method} and {method} tensors; a module has one "
                                      f"adapter method.")
            self.method = method
        if pname == "alpha":
            self.alpha = float(t.float().item())
        else:
            self.tensors[pname] = t


@dataclass
class Group:
    """The part of a file meant for one model of a pipeline (kohya's `lora_te1_`, diffusers' `unet.`)."""

    component: str  # "unet", "transformer", "text_encoder", "text_encoder_2", ...
    prefix: str  # the file's spelling (`lora_unet`, `unet`)
    modules: dict[str, ModuleWeights] = field(default_factory=dict)  # file's module name -> weights
    metadata: dict | None = None  # diffusers' adapter metadata (a PEFT config) for this group, if any


# -- files ---------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a .safetensors file and its string metadata (safetensors' `format` dropped)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err}); re-save the adapter.") from err
    metadata.pop("format", None)
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `path` atomically: a temporary file next to it, fsynced, then renamed over it."""
    from safetensors.torch import save_file

    if path.exists() and path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the .safetensors file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{path.parent}: cannot create the directory ({err}); choose a writable path.") from err
    if not os.access(path.parent, os.W_OK):
        raise CheckpointError(f"{path.parent}: not writable; choose a writable path.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = _write_temp(path, lambda t: save_file(tensors, t, metadata={"format": "pt", **metadata}))
    os.replace(tmp, path)


# -- which part of a file is this model's ----------------------------------------------------------
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and layer_kind(m) is not None}


def choose_group(groups: list[Group], model: nn.Module, component: str | None, resolve, build, where: str):
    """(group, build(group)) for the one group of the file that is this model's: all its module names
    resolve (`resolve(group)` fills each ModuleWeights.fqn and returns the names it could not) and its
    tensors fit (`build(group)` raises if not). `component` narrows the choice by name."""
    if component is not None:
        wanted = DENOISERS if component in DENOISERS else (component,)
        picked = [g for g in groups if g.component in wanted or g.prefix == component]
        if not picked:
            raise AdapterError(
                f"{where}: no {component!r} part in this file; it has {describe_groups(groups)}. "
                f"Pass component= one of {sorted({g.component for g in groups})}."
            )
        groups = picked
    results = [(g, resolve(g)) for g in groups]
    complete = [g for g, missing in results if not missing]
    if not complete:
        group, missing = max(results, key=lambda r: len(r[0].modules) - len(r[1]))
        raise AdapterError(unmatched_message(where, group, missing, model, groups))
    built, errors = [], []
    for g in complete:
        try:
            built.append((g, build(g)))
        except AdapterError as err:
            errors.append(err)
    if len(built) == 1:
        return built[0]
    if not built:
        raise errors[0]
    raise AdapterError(
        f"{where}: the parts {sorted(g.prefix for g, _ in built)} of this file all fit {type(model).__name__}; "
        f"pass component= (e.g. component={built[0][0].component!r}) to choose one."
    )


def unmatched_message(where: str, group: Group, missing: list[str], model: nn.Module, groups: list[Group]) -> str:
    """The module names of `group` that name no layer of the model, each with the closest layer names."""
    dotted = list(adaptable_modules(model))
    underscored = {n.replace(".", "_"): n for n in dotted}
    lines = []
    for name in missing[:8]:
        pool = dotted if "." in name else list(underscored)
        close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
        close = [underscored.get(c, c) for c in close]
        lines.append(f"{name}" + (f" (close: {', '.join(close)})" if close else ""))
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    others = f" The file has {describe_groups(groups)}." if len(groups) > 1 else ""
    return (
        f"{where}: {len(missing)} of {len(group.modules)} adapted modules in the file's {group.prefix!r} part match "
        f"no layer of {type(model).__name__}: {'; '.join(lines)}{more}.{others} Fix: load the file into the model "
        f"it was trained for (its UNet, transformer or text encoder, same architecture)."
    )


def describe_groups(groups: list[Group]) -> str:
    return ", ".join(f"{g.prefix!r} ({g.component}, {len(g.modules)} modules)" for g in groups)


# -- per-module tensors -> one spec ------------------------------------------------------------------
def _most_common(values: dict[str, float]):
    return collections.Counter(values.values()).most_common(1)[0][0]


def _patterns(values: dict[str, float], default) -> dict[str, float]:
    # anchored at the full module path, as diffusers writes them: `(.*\.)?(^path)$` matches only `path`
    return {f"^{fqn}": v for fqn, v in values.items() if v != default}


def _rank_and_alpha(mw: ModuleWeights) -> tuple[int, float]:
    """(r, alpha) of one module such that alpha / r is the scale its format applies.

    LoRA and LoHa: scale = alpha / rank (alpha absent or 0: 1, as kohya and LyCORIS read it). LoKr (LyCORIS, diffusers' `_bake_lokr_alpha_`):
    alpha / rank only when a factor is rank-decomposed; with both factors full the scale is 1, so
    such a module gets r = alpha = max(factor dims), which also makes PEFT's rules keep both full."""
    t = mw.tensors
    if mw.method == "lora":
        r = t["lora_A"].shape[0]
    elif mw.method == "loha":
        r = t["hada_w1_b"].shape[0]
    else:
        if "lokr_w2_b" in t or "lokr_w1_b" in t:
            r = (t.get("lokr_w2_b") if "lokr_w2_b" in t else t["lokr_w1_b"]).shape[0]
        else:
            r = max(*t["lokr_w1"].shape, *t["lokr_w2"].shape[:2])
            return r, float(r)
    return r, float(mw.alpha) if mw.alpha else float(r)


def _exact_targets(fqns: list[str], model: nn.Module):
    """The module paths as PEFT's `target_modules` (a list: name or dotted suffix, what diffusers writes),
    or, if a path is also the dotted suffix of another adaptable module, an anchored regex of exactly them."""
    wanted = set(fqns)
    if all(not n.endswith("." + f) for n in adaptable_modules(model) if n not in wanted for f in wanted):
        return list(fqns)
    return "|".join(re.escape(f) for f in fqns)


def _lokr_factor(modules: list[ModuleWeights], layers: dict, where: str) -> int:
    """The decompose_factor under which PEFT's factorization gives every module's factor shapes."""
    dims = {}
    for mw in modules:
        t = mw.tensors
        a, c = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            b, d = t["lokr_w2"].shape[:2]
        elif "lokr_t2" in t:
            b, d = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
        else:
            b = t["lokr_w2_a"].shape[0]
            layer = layers[mw.fqn]
            d = layer.weight_shape[1] // c
        dims[mw.fqn] = ((a, b), (c, d))
    for f in sorted({ab[0] for ab, _ in dims.values()}) + [-1]:
        if all(factorization(a * b, f) == (a, b) and factorization(c * d, f) == (c, d) for (a, b), (c, d) in dims.values()):
            return f
    raise CheckpointError(
        f"{where}: the LoKr factor shapes of this file do not follow one factorization rule (LyCORIS' `factor`), "
        f"so PEFT's LoKr cannot hold them; e.g. {next(iter(dims))}: W1 {dims[next(iter(dims))][0]}."
    )


def build_spec(modules: list[ModuleWeights], model: nn.Module, where: str):
    """(spec, PEFT-keyed tensors) for the resolved modules of one group, checked against the model."""
    methods = collections.defaultdict(list)
    for mw in modules:
        methods[mw.method].append(mw.name)
    if len(methods) > 1:
        shown = "; ".join(f"{m}: {names[0]} (+{len(names) - 1})" for m, names in methods.items())
        raise CheckpointError(
            f"{where}: the file mixes adapter methods ({shown}); one adapter is one method. Split the file per "
            f"method and load each as its own named adapter."
        )
    (name,) = methods
    method = METHODS[name]
    all_modules = dict(model.named_modules())
    layers = {mw.fqn: describe_layer(mw.fqn, all_modules[mw.fqn]) for mw in modules}
    ranks, alphas = {}, {}
    for mw in modules:
        ranks[mw.fqn], alphas[mw.fqn] = _rank_and_alpha(mw)
    r, alpha = _most_common(ranks), _most_common(alphas)
    common = dict(r=r, alpha=alpha, targets=_exact_targets([mw.fqn for mw in modules], model),
                  rank_pattern=_patterns(ranks, r), alpha_pattern=_patterns(alphas, alpha))
    if name == "lora":
        spec = method.spec_type(**common, use_dora=any("lora_magnitude_vector" in mw.tensors for mw in modules))
    elif name == "loha":
        spec = method.spec_type(**common, use_effective_conv2d=any("hada_t1" in mw.tensors for mw in modules))
    else:
        spec = method.spec_type(**common, decompose_both=any("lokr_w1_a" in mw.tensors for mw in modules),
                                decompose_factor=_lokr_factor(modules, layers, where),
                                use_effective_conv2d=any("lokr_t2" in mw.tensors for mw in modules))
    tensors = {}
    for mw in modules:
        layer = layers[mw.fqn]
        for pname, t in mw.tensors.items():
            tensors[f"{PEFT_PREFIX}{mw.fqn}.{method.peft_key(pname, layer)}"] = t
    expected = expected_tensors(spec, model, where)
    return spec, fit_shapes(expected, tensors, layers, where)


def expected_tensors(spec, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """PEFT key -> a meta tensor of the shape `spec` creates on `model` (nothing is allocated); the
    method's own checks run on every target first, so a spec the model cannot take fails here."""
    method = method_for(spec)
    modules = dict(model.named_modules())
    out = {}
    for fqn in resolve_targets(spec, model, layer_kind):
        layer = describe_layer(fqn, modules[fqn])
        method.check(spec, layer)
        weight = torch.empty(layer.weight_shape, dtype=layer.dtype, device="meta")
        with torch.device("meta"):
            params = method.init_params(spec, layer, weight)
        for pname, t in params.items():
            key = method.peft_key(pname, layer)
            if key is not None:
                out[f"{PEFT_PREFIX}{fqn}.{key}"] = t
    return out


def fit_shapes(expected: dict, given: dict, layers: dict, where: str) -> dict:
    """Reshape what differs only by singleton dims (kohya stores a 1×1 conv's LoRA as 4-D, a Linear's as
    2-D; LyCORIS stores DoRA's magnitude as (d_out, 1, …)), then check keys and shapes against the model."""
    out = dict(given)
    for key, t in given.items():
        want = expected.get(key)
        if want is None or tuple(t.shape) == tuple(want.shape):
            continue
        if key.endswith("lora_magnitude_vector"):
            fqn = key[len(PEFT_PREFIX):].rsplit(".", 1)[0]
            if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] != 1 and layers[fqn].out_features != 1:
                raise CheckpointError(
                    f"{where}: {fqn}: the DoRA scale has shape {tuple(t.shape)}, LyCORIS' input-axis weight "
                    f"decomposition (wd_on_out=False). PEFT's DoRA (and ours) normalises per output channel; "
                    f"retrain with wd_on_out=True or load it without DoRA."
                )
        if t.numel() == want.numel() and [d for d in t.shape if d != 1] == [d for d in want.shape if d != 1]:
            out[key] = t.reshape(want.shape)
    check_tensors(expected, out, where, "the model")
    return out


def savable_spec(table, name: str, fmt: str, savable: tuple, holds: str, instead: str):
    """(spec, method) of adapter `name`, refused by name when format `fmt` cannot hold its method
    (`holds`: what the format's files hold; `instead`: what to save it as) or its modules_to_save."""
    spec = table.specs[name]
    method = method_for(spec)
    if method.name not in savable:
        raise AdapterError(f"save_adapter(format={fmt!r}): adapter {name!r} is {type(spec).__name__}; {holds}. {instead}")
    if spec.modules_to_save:
        raise AdapterError(f"save_adapter(format={fmt!r}): adapter {name!r} has modules_to_save "
                           f"{spec.modules_to_save}, which {fmt} files cannot hold; save it with format='peft'.")
    return spec, method

