"""The bad-input catalogue: every user-facing entry point rejects bad input with a clear error that names
the module or file and the fix, BEFORE anything is modified.

Each case is a row of a table (id, what is done, expected exception, expected message substrings).
After every error the user's model and the AdaptedModule are compared bit for bit with a snapshot
taken before (tensors, requires_grad flags, training flags, gradients, active adapters, merge state).

Per-method rows (rank fields, shape constraints, layer kinds) name their method; a row whose method is
not registered fails (nothing is skipped). A method that is registered without a row in RANK_FIELDS
fails `test_every_method_has_rank_cases`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import adapt_compiler as ac
from adapt_compiler.checkpoint import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, CheckpointError
from adapt_compiler.passes import METHODS
from adapt_compiler.passes.method import AdapterError, AdapterShapeError, GraphMethod


# -- models ------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.block = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        return self.out(self.block(self.norm(self.q_proj(x) + self.v_proj(x))))


class Nested(nn.Module):
    """The same leaf names one level deeper (a checkpoint of 'another model')."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Tiny()])

    def forward(self, x):
        return self.layers[0](x)


class Kinds(nn.Module):
    """One layer of each kind, for kind and shape checks (errors come before any forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.odd = nn.Linear(6, 8)
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.conv1 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.lin(x)


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


# -- snapshots -----------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).clone() if t.numel() else t.clone()


def snapshot(module: nn.Module) -> dict:
    snap = {
        "tensors": {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in module.state_dict(keep_vars=True).items()},
        "buffers": {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in module.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "grads": {n: None if p.grad is None else _bits(p.grad) for n, p in module.named_parameters()},
        "training": {n: m.training for n, m in module.named_modules()},
    }
    if isinstance(module, ac.AdaptedModule):
        snap["adapters"] = (list(module.state.specs), module.active_adapters, module.merged, module._enabled)
    return snap


def assert_same(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys()
    for key in before:
        b, a = before[key], after[key]
        if isinstance(b, dict):
            assert b.keys() == a.keys(), f"{what}: {key} names changed: {sorted(set(b) ^ set(a))[:5]}"
            for n in b:
                x, y = b[n], a[n]
                if isinstance(x, tuple):
                    same = x[:2] == y[:2] and torch.equal(x[2], y[2])
                elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                    same = x is not None and y is not None and torch.equal(x, y)
                else:
                    same = x == y
                assert same, f"{what}: {key}[{n}] changed"
        else:
            assert b == a, f"{what}: {key} changed: {b} -> {a}"


# -- the environment each case runs in -------------------------------------------------------------------
@dataclass
class Env:
    tmp: Path
    model: nn.Module
    m: ac.AdaptedModule
    x: torch.Tensor
    good: Path  # a valid checkpoint of m
    extra: dict = field(default_factory=dict)

    def checkpoint(self, name: str, config: dict | None = None, tensors: dict | None = None) -> Path:
        """A copy of the good checkpoint with its config and/or tensors replaced."""
        from safetensors.torch import load_file, save_file

        d = self.tmp / name
        d.mkdir()
        cfg = json.loads((self.good / CONFIG_NAME).read_text())
        cfg.update(config or {})
        (d / CONFIG_NAME).write_text(json.dumps(cfg))
        save_file(tensors if tensors is not None else load_file(str(self.good / WEIGHTS_NAME)), str(d / WEIGHTS_NAME))
        return d

    def good_tensors(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.good / WEIGHTS_NAME))


@pytest.fixture
def env(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    m = ac.compile(model, ac.LoRA(r=2, alpha=4, targets=["q_proj", "v_proj"], init=False), lowering="eager")
    x = torch.randn(3, 8)  # not captured here (0.5 s each); test_module_still_works_after_errors runs it
    good = tmp_path / "good"
    m.save_adapter(good)
    return Env(tmp_path, model, m, x, good)


def run_case(env: Env, fn: Callable, exc, substrings) -> None:
    """Run fn(env), expect `exc` with every substring in its message, and nothing modified."""
    model_before, m_before = snapshot(env.model), snapshot(env.m)
    with pytest.raises(exc) as info:
        fn(env)
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"expected {s!r} in the message: {msg}"
    assert_same(model_before, snapshot(env.model), "user model")
    assert_same(m_before, snapshot(env.m), "AdaptedModule")


def lora(**kw):
    kw.setdefault("targets", ["q_proj", "v_proj"])
    return ac.LoRA(r=kw.pop("r", 2), **kw)


class BogusSpec(ac.AdapterSpec):
    method = "bogus"


# -- specs, compile, adapters: (id, fn, exception, substrings) ---------------------------------------------
API_CASES = [
    # specs
    ("spec-unknown-field", lambda e: ac.LoRA(rank=8), TypeError, ["rank"]),
    ("spec-unknown-method-name", lambda e: ac.NoSuchMethod, AttributeError, ["NoSuchMethod"]),
    ("spec-zero-rank", lambda e: ac.LoRA(r=0), AdapterError, ["r=0", "positive integer"]),
    ("spec-negative-rank", lambda e: ac.LoRA(r=-4), AdapterError, ["r=-4", "positive integer"]),
    ("spec-float-rank", lambda e: ac.LoRA(r=2.5), AdapterError, ["r=2.5"]),
    ("spec-bool-rank", lambda e: ac.LoRA(r=True), AdapterError, ["r=True"]),
    ("spec-bad-alpha", lambda e: ac.LoRA(alpha=0), AdapterError, ["alpha=0"]),
    ("spec-bad-dropout", lambda e: ac.LoRA(dropout=1.5), AdapterError, ["dropout=1.5", "[0, 1)"]),
    ("spec-bad-init", lambda e: ac.LoRA(init="lora-ga"), AdapterError, ["init='lora-ga'", "'lora_ga'"]),
    ("spec-bad-order", lambda e: ac.LoRA(order="sideways"), AdapterError, ["order='sideways'"]),
    ("spec-empty-targets", lambda e: ac.LoRA(targets=[]), AdapterError, ["targets=[]"]),
    # compile
    ("compile-unknown-method", lambda e: ac.compile(e.model, BogusSpec(targets=["q_proj"])), AdapterError,
     ["unknown adapter method 'bogus'", "lora"]),
    ("compile-not-a-module", lambda e: ac.compile(object(), lora()), AdapterError, ["torch.nn.Module"]),
    ("compile-bad-spec-type", lambda e: ac.compile(e.model, 42), AdapterError, ["spec must be", "int"]),
    ("compile-bad-spec-in-dict", lambda e: ac.compile(e.model, {"a": 42}), AdapterError, ["'a'", "int"]),
    ("compile-empty-dict", lambda e: ac.compile(e.model, {}), AdapterError, ["spec must be"]),
    ("compile-bad-lowering", lambda e: ac.compile(e.model, lora(), lowering="tvm"), AdapterError, ["lowering='tvm'"]),
    ("targets-match-nothing", lambda e: ac.compile(e.model, lora(targets=["q_prj"])), AdapterError,
     ["matched no module", "q_proj"]),
    ("targets-regex-nothing", lambda e: ac.compile(e.model, lora(targets=r".*attn\..*")), AdapterError,
     ["matched no module"]),
    ("targets-container-only", lambda e: ac.compile(e.model, lora(targets=["block"])), AdapterError,
     ["matched no module"]),
    ("targets-unsupported-kind", lambda e: ac.compile(e.model, lora(targets=["norm"])), AdapterError,
     ["norm (LayerNorm)", "Supported layers"]),
    ("targets-none-no-default", lambda e: ac.compile(e.model, lora(targets=None)), AdapterError,
     ["targets=None", "no default"]),
    ("targets-all-excluded", lambda e: ac.compile(e.model, lora(exclude=["q_proj", "v_proj"])), AdapterError,
     ["matched no module"]),
    ("compile-adapter-name-dots", lambda e: ac.compile(e.model, {"a.b": lora()}), AdapterError, ["'a.b'", "dots"]),
    ("compile-modules-to-save-missing", lambda e: ac.compile(e.model, lora(modules_to_save=["outt"])),
     AdapterError, ["modules_to_save", "'outt'", "out"]),
    ("compile-inputs-do-not-fit", lambda e: ac.compile(e.model, lora(), lowering="eager",
                                                        example_inputs=torch.randn(2, 5)),
     AdapterError, ["could not capture", "Fix"]),
    ("lora-rank-pattern-zero", lambda e: ac.compile(e.model, lora(rank_pattern={"q_proj": 0})), AdapterError,
     ["q_proj", "r=0"]),
    # the AdaptedModule's own methods
    ("add-adapter-duplicate", lambda e: e.m.add_adapter("default", lora()), AdapterError, ["'default'", "already exists"]),
    ("add-adapter-modules-to-save-missing", lambda e: e.m.add_adapter("other", lora(modules_to_save=["outt"])),
     AdapterError, ["modules_to_save", "'outt'"]),
    ("add-adapter-no-match", lambda e: e.m.add_adapter("other", lora(targets=["k_proj"])), AdapterError,
     ["matched no module"]),
    ("set-adapter-unknown", lambda e: e.m.set_adapter("nope"), AdapterError, ["'nope'", "default"]),
    ("delete-adapter-unknown", lambda e: e.m.delete_adapter("nope"), AdapterError, ["'nope'", "default"]),
    ("state-dict-unknown-adapter", lambda e: e.m.adapter_state_dict("nope"), AdapterError, ["'nope'"]),
    # save_adapter: nothing is created or overwritten
    ("save-under-a-file", lambda e: e.m.save_adapter(e.extra["file"] / "ckpt"), CheckpointError,
     ["cannot create the directory", "writable"]),
    ("save-onto-a-file", lambda e: e.m.save_adapter(e.extra["file"]), CheckpointError,
     ["exists and is not a directory"]),
    ("save-unknown-adapter", lambda e: e.m.save_adapter(e.tmp / "x", adapter_name="nope"), AdapterError,
     ["no adapter named 'nope'"]),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_rejects_bad_input(env, case):
    _, fn, exc, substrings = case
    afile = env.tmp / "afile"
    afile.write_text("not a directory")
    env.extra["file"] = afile
    listing = sorted(p.name for p in env.tmp.iterdir())
    run_case(env, fn, exc, substrings)
    assert sorted(p.name for p in env.tmp.iterdir()) == listing, "files were created"
    assert afile.read_text() == "not a directory"


def test_module_still_works_after_errors(env):
    """After a series of rejected calls the AdaptedModule gives bit-identical outputs and still trains."""
    y = env.m(env.x)
    bad = env.checkpoint("nan", tensors={k: torch.full_like(v, float("nan")) for k, v in env.good_tensors().items()})
    for fn in (lambda: env.m.load_adapter(bad, "other"), lambda: env.m.load_adapter(bad, "default", hotswap=True),
               lambda: env.m.add_adapter("other", lora(modules_to_save=["outt"])),
               lambda: env.m.save_adapter(env.good / CONFIG_NAME)):
        with pytest.raises(AdapterError):
            fn()
    assert torch.equal(env.m(env.x), y)
    env.m(env.x).sum().backward()
    assert all(p.grad is not None for p in env.m.adapter_parameters())


# -- checkpoints: (id, make the bad dir, substrings) x every loading entry point ------------------------------
def _evil_pickle(e: Env) -> Path:
    d = e.checkpoint("evil")
    (d / WEIGHTS_NAME).unlink()
    e.extra["marker"] = e.tmp / "pwned"
    torch.save({"x": Evil(str(e.extra["marker"]))}, d / LEGACY_WEIGHTS_NAME)
    return d


class Evil:
    """A pickle with code: unpickling it would create a file (weights_only loading must refuse it)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _truncated(e: Env) -> Path:
    d = e.checkpoint("truncated")
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return d


def _bad_header(e: Env) -> Path:
    d = e.checkpoint("bad_header")
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # header length far past the end of the file
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    return d


def _garbage(e: Env) -> Path:
    d = e.checkpoint("garbage")
    (d / WEIGHTS_NAME).write_bytes(os.urandom(64))
    return d


def _json_header_garbage(e: Env) -> Path:
    d = e.checkpoint("json_garbage")
    header = b"{not json at all}"
    (d / WEIGHTS_NAME).write_bytes(len(header).to_bytes(8, "little") + header)
    return d


def _other_model_shapes(e: Env) -> Path:
    torch.manual_seed(1)
    other = ac.compile(Tiny(d=12), lora(), lowering="eager")
    other.save_adapter(e.tmp / "other_model_shapes")
    return e.tmp / "other_model_shapes"


def _other_model_keys(e: Env) -> Path:
    torch.manual_seed(1)
    other = ac.compile(Nested(), lora(), lowering="eager")  # same leaf names, other paths
    other.save_adapter(e.tmp / "other_model_keys")
    return e.tmp / "other_model_keys"


def _other_method(e: Env) -> Path:
    # a LoRA config over LoHa-shaped tensors (e.g. a mislabelled checkpoint of another method)
    t = {f"base_model.model.{n}.hada_{w}": torch.zeros(2, 8) for n in ("q_proj", "v_proj")
         for w in ("w1_a", "w1_b", "w2_a", "w2_b")}
    return e.checkpoint("other_method", tensors=t)


def _other_rank(e: Env) -> Path:
    torch.manual_seed(1)
    other = ac.compile(Tiny(), lora(r=4), lowering="eager")
    other.save_adapter(e.tmp / "other_rank")
    cfg = json.loads((e.good / CONFIG_NAME).read_text())  # the config says r=2, the tensors are r=4
    (e.tmp / "other_rank" / CONFIG_NAME).write_text(json.dumps(cfg))
    return e.tmp / "other_rank"


def _nonfinite(value: float, name: str):
    def make(e: Env) -> Path:
        t = e.good_tensors()
        key = "base_model.model.v_proj.lora_B.weight"
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return e.checkpoint(name, tensors=t)

    return make


def _mkdir(name: str, files: dict):
    def make(e: Env) -> Path:
        d = e.tmp / name
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_text(content)
        return d

    return make


CHECKPOINT_CASES = [
    ("missing-dir", lambda e: e.tmp / "missing", ["not a directory"]),
    ("no-config", _mkdir("no_config", {}), [CONFIG_NAME]),
    ("bad-json", _mkdir("bad_json", {CONFIG_NAME: "{r: 8"}), ["not valid JSON"]),
    ("no-peft-type", _mkdir("no_peft_type", {CONFIG_NAME: "{}"}), ["'peft_type'"]),
    ("unknown-peft-type", lambda e: e.checkpoint("unknown_type", config={"peft_type": "NOPE"}),
     ["'NOPE'", "not supported", "LORA"]),
    ("no-weights", _mkdir("no_weights", {CONFIG_NAME: json.dumps({"peft_type": "LORA", "r": 2,
                                                                   "target_modules": ["q_proj"]})}),
     [WEIGHTS_NAME, LEGACY_WEIGHTS_NAME]),
    ("truncated-safetensors", _truncated, ["truncated or corrupt", WEIGHTS_NAME]),
    ("corrupt-header-length", _bad_header, ["truncated or corrupt"]),
    ("corrupt-header-json", _json_header_garbage, ["truncated or corrupt"]),
    ("random-bytes", _garbage, ["truncated or corrupt"]),
    ("pickle-with-code", _evil_pickle, ["refused", "weights_only", LEGACY_WEIGHTS_NAME]),
    ("other-model-shapes", _other_model_shapes, ["shape mismatches", "q_proj.lora_A.weight", "(2, 12)", "(2, 8)"]),
    ("other-model-keys", _other_model_keys, ["missing keys", "unexpected keys", "layers.0.q_proj"]),
    ("other-method", _other_method, ["missing keys", "unexpected keys", "hada_w1_a", "lora_A"]),
    ("config-rank-mismatch", _other_rank, ["shape mismatches", "(4, 8)", "(2, 8)"]),
    ("nan-weights", _nonfinite(float("nan"), "nan"), ["NaN/Inf", "v_proj.lora_B"]),
    ("inf-weights", _nonfinite(float("inf"), "inf"), ["NaN/Inf", "v_proj.lora_B"]),
]

LOADERS = {
    "compile": lambda e, d: ac.compile(e.model, str(d), lowering="eager"),
    "compile-dict": lambda e, d: ac.compile(e.model, {"x": lora(), "y": d}, lowering="eager"),
    "load_adapter": lambda e, d: e.m.load_adapter(d, "other"),
    "hotswap": lambda e, d: e.m.load_adapter(d, "default", hotswap=True),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_rejected(env, case, loader):
    name, make, substrings = case
    d = make(env)
    run_case(env, lambda e: LOADERS[loader](e, d), CheckpointError if name not in ("unknown-peft-type",) else AdapterError,
             [*substrings, d.name])
    if "marker" in env.extra:
        assert not env.extra["marker"].exists(), "the pickle's code ran"


STATE_DICT_CASES = [
    ("other-method", lambda e: {f"base_model.model.q_proj.hada_w1_a": torch.zeros(2, 8)},
     ["missing keys", "unexpected keys", "hada_w1_a"]),
    ("wrong-shape", lambda e: {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in e.good_tensors().items()},
     ["shape mismatches", "q_proj.lora_A.weight"]),
    ("nan", lambda e: {k: torch.full_like(v, float("nan")) for k, v in e.good_tensors().items()}, ["NaN/Inf"]),
    ("partial", lambda e: dict(list(e.good_tensors().items())[:1]), ["missing keys"]),
]


@pytest.mark.parametrize("case", STATE_DICT_CASES, ids=[c[0] for c in STATE_DICT_CASES])
def test_state_dict_rejected(env, case):
    _, make, substrings = case
    sd = make(env)
    run_case(env, lambda e: e.m.load_adapter_state_dict(sd), CheckpointError, substrings)


def test_legacy_bin_without_code_loads(env):
    """A legacy adapter_model.bin that weights_only loading accepts is loaded (and equals the safetensors one)."""
    d = env.checkpoint("legacy")
    torch.save(env.good_tensors(), d / LEGACY_WEIGHTS_NAME)
    (d / WEIGHTS_NAME).unlink()
    m2 = ac.compile(env.model, str(d), lowering="eager")
    assert torch.equal(m2(env.x), env.m(env.x))


# -- per-method rows: rank fields, shape constraints, layer kinds ---------------------------------------------
# required fields of a method's spec (so the other field is the only bad one)
BASE_KWARGS = {"adalora": {"total_step": 10}, "llama_adapter": {"adapter_len": 2, "adapter_layers": 1},
               "xlora": {"experts": {"a": ac.LoRA(r=2, targets=["q_proj"])}}}
# method -> {field: bad values}; OFT/BOFT take 0 to mean "derived from the other field"
RANK_FIELDS = {
    "lora": {"r": [0, -1]},
    "loha": {"r": [0, -1]},
    "lokr": {"r": [0, -1]},
    "adalora": {"init_r": [0, -1], "target_r": [0]},
    "oft": {"r": [-1], "oft_block_size": [-1]},
    "boft": {"boft_block_size": [-1], "boft_n_butterfly_factor": [0]},
    "hra": {"r": [0, -1]},
    "bone": {"r": [0, -1], "mini_r": [0]},
    "llama_adapter": {"adapter_len": [0, -1], "adapter_layers": [0]},
    "xlora": {"xlora_depth": [0], "xlora_size": [-1], "top_k_lora": [0]},
}
RANK_CASES = [(m, f, v) for m, fs in RANK_FIELDS.items() for f, vs in fs.items() for v in vs]


def test_every_method_has_rank_cases():
    missing = [n for n in METHODS if n not in RANK_FIELDS]
    assert not missing, f"add the rank/size fields of {missing} to RANK_FIELDS in tests/test_bad_input.py"
    unknown = [n for n in RANK_FIELDS if n not in METHODS]
    assert not unknown, f"RANK_FIELDS names methods that are not registered: {unknown}"


def _spec(method: str, **kw):
    from dataclasses import fields

    assert method in METHODS, f"{method} is not registered; registered: {sorted(METHODS)}"
    spec_type = METHODS[method].spec_type
    names = {f.name for f in fields(spec_type)}
    unknown = sorted(set(kw) - names)
    if unknown:
        pytest.fail(f"{spec_type.__name__} has no field(s) {unknown}; update tests/test_bad_input.py.")
    return spec_type(**{**BASE_KWARGS.get(method, {}), **kw})


@pytest.mark.parametrize("method,fname,value", RANK_CASES, ids=[f"{m}-{f}={v}" for m, f, v in RANK_CASES])
def test_rank_field_rejected(env, method, fname, value):
    run_case(env, lambda e: _spec(method, **{fname: value}), AdapterError, [f"{fname}={value!r}"])


# (method, spec fields, target in Kinds, substrings): each a shape the method cannot take
SHAPE_CASES = [
    ("lora", {"r": 3}, "conv", ["conv", "r=3", "groups=2"]),
    ("oft", {"r": 0, "oft_block_size": 3}, "lin", ["lin", "oft_block_size=3"]),
    ("oft", {"r": 0, "oft_block_size": 16}, "lin", ["lin", "oft_block_size=16"]),
    ("oft", {"r": 0, "oft_block_size": 2}, "conv", ["conv", "groups=2"]),
    ("boft", {"boft_block_size": 3}, "lin", ["lin", "boft_block_size=3"]),
    ("boft", {"boft_block_size": 2, "boft_n_butterfly_factor": 4}, "lin", ["lin", "boft_n_butterfly_factor=4"]),
    ("boft", {"boft_block_size": 2}, "conv", ["conv", "groups=2"]),
    ("hra", {"r": 2}, "conv", ["conv", "groups=2"]),
    ("adalora", {"init_r": 2, "target_r": 2}, "conv", ["conv", "groups=2"]),
    ("bone", {"r": 16}, "lin", ["lin", "r=16"]),
    ("bone", {"r": 3, "bat": True}, "lin", ["lin", "r=3", "bat"]),
    ("bone", {"r": 4, "bat": True}, "odd", ["odd", "r=4", "bat"]),
    ("bone", {"r": 2, "mode": "mini", "mini_r": 3}, "lin", ["lin", "mini_r=3"]),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(SHAPE_CASES)])
def test_shape_constraint_rejected(env, case):
    method, kw, target, substrings = case
    model = Kinds()
    before = snapshot(model)
    with pytest.raises(AdapterShapeError) as info:
        ac.compile(model, _spec(method, targets=[target], **kw), lowering="eager")
    for s in substrings:
        assert s in str(info.value), f"expected {s!r} in: {info.value}"
    assert_same(before, snapshot(model), "user model")


def _kind_cases():
    """(method, layer kind it does not adapt, target): only the combinations that must be rejected."""
    out = []
    for name in sorted(METHODS):
        method = METHODS[name]
        if isinstance(method, GraphMethod):  # graph methods do not target layers by kind
            continue
        for kind, target in (("embedding", "emb"), ("conv2d", "conv1")):
            if kind not in method.kinds:
                out.append((name, kind, target))
    return out


@pytest.mark.parametrize("method,kind,target", _kind_cases(), ids=[f"{m}-{k}" for m, k, _ in _kind_cases()])
def test_unsupported_layer_kind_rejected(method, kind, target):
    model = Kinds()
    before = snapshot(model)
    with pytest.raises(AdapterError) as info:
        ac.compile(model, _spec(method, targets=[target]), lowering="eager")
    assert target in str(info.value) and kind in str(info.value), str(info.value)
    assert_same(before, snapshot(model), "user model")


# -- merge and export ---------------------------------------------------------------------------------------
@pytest.fixture
def conv_env(tmp_path):
    """LoRA on a grouped conv: adapted fine, but (like PEFT) not mergeable."""
    torch.manual_seed(0)
    model = GroupedConv().eval()
    m = ac.compile(model, ac.LoRA(r=2, targets=["conv"], init=False), lowering="eager")
    x = torch.randn(1, 4, 5, 5)
    return Env(tmp_path, model, m, x, tmp_path)


MERGE_CASES = [
    ("merge", lambda e: e.m.merge(), ["conv", "groups > 1"]),
    ("merged_module", lambda e: e.m.merged_module(), ["conv", "groups > 1"]),
    ("compile-merge", lambda e: ac.compile(e.model, ac.LoRA(r=2, targets=["conv"]), merge=True), ["groups > 1"]),
    ("export-merge", lambda e: ac.export(e.m, (e.x,), merge=True), ["conv", "groups > 1"]),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_unmergeable_rejected(conv_env, case):
    _, fn, substrings = case
    run_case(conv_env, fn, AdapterError, substrings)


def test_merged_state_errors(env):
    env.m.merge()
    run_case(env, lambda e: e.m.set_adapter("default"), AdapterError, ["unmerge() first"])
    run_case(env, lambda e: e.m.delete_adapter("default"), AdapterError, ["unmerge() first"])
    env.m.unmerge()


# graph-level methods without a weight form, on a model they fit: method -> (spec kwargs, model factory, inputs)
NON_MERGEABLE = {
    "llama_adapter": ({"adapter_len": 2, "adapter_layers": 1}, "tiny_llama"),
    "xlora": ({"experts": {"a": ac.LoRA(r=2, targets=["q_proj"]), "b": ac.LoRA(r=2, targets=["v_proj"])},
               "xlora_size": 8}, "tiny_llama"),
}


@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if m.merge_kind == "none"))
def test_non_mergeable_method_refuses_merge(tmp_path, method):
    assert method in NON_MERGEABLE, f"{method} has no weight form: add a model for it to NON_MERGEABLE"
    import models

    kw, factory = NON_MERGEABLE[method]
    model = getattr(models, factory)()
    m = ac.compile(model, _spec(method, **kw), lowering="eager")
    e = Env(tmp_path, model, m, None, tmp_path)
    before, m_before = snapshot(model), snapshot(m)
    for fn in (m.merge, m.merged_module):
        with pytest.raises(AdapterError, match="cannot be merged"):
            fn()
    with pytest.raises(AdapterError, match="merged"):
        ac.export(m, models.token_batch(), merge=True)
    assert_same(before, snapshot(model), "user model")
    assert_same(m_before, snapshot(m), "AdaptedModule")
    del e


def test_export_and_package_reject_bad_input(env):
    run_case(env, lambda e: ac.export(e.m, ("not a tensor",)), AdapterError, ["no tensor"])
    ep = ac.export(env.m, (env.x,), merge=True)
    afile = env.tmp / "afile"
    afile.write_text("x")
    run_case(env, lambda e: ac.package(ep, afile / "model.pt2"), AdapterError, ["cannot create the directory"])
    run_case(env, lambda e: ac.package(ep, env.tmp / "model.bin"), AdapterError, [".pt2"])
    run_case(env, lambda e: ac.package(ep, afile.with_suffix(".pt2").parent / "afile"), AdapterError, [".pt2"])
    existing = env.tmp / "existing.pt2"
    existing.write_text("keep me")
    run_case(env, lambda e: ac.package(ep, existing), AdapterError, ["already exists", "force=True"])
    assert existing.read_text() == "keep me"


# -- the CLI --------------------------------------------------------------------------------------------------
def test_cli_unknown_command(capsys):
    from adapt_compiler.cli import main

    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_adapter_error_is_a_message_not_a_traceback(monkeypatch, capsys):
    """An AdapterError in any subcommand is printed as `adapt-compiler <cmd>: error: ...` with exit code 2."""
    import types

    from adapt_compiler import cli

    def add_parser(sub):
        p = sub.add_parser("broken")
        p.add_argument("path")
        return p

    def run(args):
        raise CheckpointError(f"{args.path}: no {CONFIG_NAME}; is this a PEFT adapter directory?")

    fake = types.SimpleNamespace(add_parser=add_parser, run=run)
    monkeypatch.setattr(cli, "_command_modules", lambda: iter([fake]))
    assert cli.main(["broken", "/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "adapt-compiler broken: error: /no/such/dir" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [(["demo", "--steps", "many"], "invalid int"),
                                         (["demo", "--lowering", "tvm"], "invalid choice")])
def test_cli_bad_arguments(argv, needle, capsys):
    from adapt_compiler.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


CLI_CASES = [
    ("inspect", ["inspect", "--model", "nosuchmodel", "--spec", "LoRA(r=8)"], ["nosuchmodel", "not understood"]),
    ("inspect", ["inspect", "--model", "llama", "--spec", "LoRA(r=0)"], ["r=0", "positive integer"]),
    ("inspect", ["inspect", "--model", "llama", "--spec", "LoRA(r=2, targets=['q_prj'])"],
     ["matched no module", "q_proj"]),
    ("inspect", ["inspect", "--model", "llama", "--adapter", "{tmp}/missing"], ["missing", "not a directory"]),
    ("export", ["export", "--model", "python:models:tiny_llama", "--adapter", "{tmp}/missing", "--out", "{tmp}/m.pt2"],
     ["missing", "not a directory"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CLI_CASES)])
def test_cli_commands_reject_bad_input(case, tmp_path, capsys):
    from adapt_compiler.cli import main

    command, argv, needles = case
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"adapt-compiler {command}: error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, f"expected {needle!r} in: {err}"
    assert list(tmp_path.iterdir()) == [], "files were created"
