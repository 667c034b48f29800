"""Ahead-of-time export (issue 7): ExportedProgram, AOTInductor package, ONNX, and the `export` CLI.

Every artifact is checked against the AdaptedModule it came from, on two batch sizes and sequence
lengths. AOTInductor compiles are slow on CPU, so there are three, shared through module fixtures:
the merged LoRA package (the demo's path), one unmerged package carrying LoRA plus one method of each
weight-level family (additive, orthogonal) on different layers (adapter swap via load_constants),
and one unmerged package of a graph-level method. Packages are loaded and run in a fresh process that
does not import adapt_compiler (nor transformers). Each family is served by one method (FAMILIES); a
method missing from the registry or a spec that cannot be built fails, it is not skipped.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler import cli
from adapt_compiler.export import adapter_constants, is_unmerged
from models import tiny_llama, token_batch
from oracle import assert_close

HERE = Path(__file__).parent
RUNNER = HERE / "aoti_runner.py"

# two batch sizes and sequence lengths; the first is also the export example (padding on its last row)
BATCHES = [token_batch(2, 7, seed=1), token_batch(3, 11, seed=2)]

# the method each family is tested with: (method name, spec factory taking `targets`)
FAMILIES = {
    "lora": ("lora", lambda t: ac.LoRA(r=4, alpha=8, targets=t, init=False)),
    "additive": ("loha", lambda t: ac.LoHa(r=4, alpha=8, targets=t, init_weights=False)),
    "orthogonal": ("oft", lambda t: ac.OFT(r=0, oft_block_size=16, targets=t, init_weights=False)),
    "graph": ("llama_adapter", lambda t: ac.LlamaAdapter(adapter_len=4, adapter_layers=1)),
}
# each family on its own layer, so several can be active at once in one graph
FAMILY_TARGETS = {"lora": ["q_proj"], "additive": ["v_proj"], "orthogonal": ["o_proj"], "graph": None}


def _randomize(m, seed: int) -> None:
    """Non-trivial values for every adapter tensor (so that adapters change the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m._adapter_tensors():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def _spec(family: str):
    """(method name, spec) of the family's method."""
    name, factory = FAMILIES[family]
    assert name in ac.METHODS, f"{family}: method {name!r} is not registered; registered: {sorted(ac.METHODS)}"
    return name, factory(FAMILY_TARGETS[family])


def _adapted(base, specs: dict, seed: int):
    m = ac.compile(base, specs, lowering="eager")
    m.set_adapter(list(specs))
    _randomize(m, seed)
    return m.eval()


def _ref(m, batch) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).logits


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _run_package(path: Path, tmp: Path, inputs, swap=None) -> dict:
    """Run a package in a fresh process (no adapt_compiler, no transformers); returns the runner's report."""
    job, out = tmp / f"{path.stem}.job.pt", tmp / f"{path.stem}.out.pt"
    torch.save({"inputs": [((), b) for b in inputs], "swap": swap}, job)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(RUNNER), str(path), str(job), str(out)], env=env, cwd=str(tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"package runner failed:\n{proc.stderr[-4000:]}"
    report = torch.load(out, weights_only=True)
    assert report["imported"] == [], f"the runner imported {report['imported']}"
    return report


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def lora(base):
    return _adapted(base, {"default": _spec("lora")[1]}, seed=10)


@pytest.fixture(scope="module")
def merged_package(lora, tmp_path_factory):
    """Package 1/3: merged LoRA, written over an existing file with force=True."""
    tmp = tmp_path_factory.mktemp("merged")
    path = tmp / "model.pt2"
    path.write_bytes(b"old")
    ep = ac.export(lora, kwargs=BATCHES[0], merge=True)
    assert ac.package(ep, path, force=True) == path
    return path, tmp


def _combo_specs():
    return {family: _spec(family)[1] for family in ("lora", "additive", "orthogonal")}


@pytest.fixture(scope="module")
def combo(base):
    """LoRA + the first additive + the first orthogonal method, all active, on different layers; two
    instances with the same structure and different weights (for the swap)."""
    specs = _combo_specs()
    return _adapted(base, specs, seed=20), _adapted(base, specs, seed=21)


@pytest.fixture(scope="module")
def combo_package(combo, tmp_path_factory):
    """Package 2/3: the combo, unmerged."""
    tmp = tmp_path_factory.mktemp("combo")
    ep = ac.export(combo[0], kwargs=BATCHES[0], merge=False)
    return ac.package(ep, tmp / "combo.pt2"), tmp


# -- ExportedProgram -----------------------------------------------------------------------------
def _op_counts(ep):
    return collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("family", ["lora", "additive", "orthogonal", "graph"])
def test_exported_program_matches(family, base, tmp_path):
    method, spec = _spec(family)
    m = _adapted(base, {"default": spec}, seed=1)
    mergeable = ac.METHODS[method].merge_kind != "none"
    refs = [_ref(m, b) for b in BATCHES]

    programs = {"unmerged": ac.export(m, kwargs=BATCHES[0], merge=False)}
    if mergeable:
        programs["merged"] = ac.export(m, kwargs=BATCHES[0])
    else:
        with pytest.raises(ac.AdapterError, match="merge"):
            ac.export(m, kwargs=BATCHES[0], merge=True)
    for kind, ep in programs.items():
        assert isinstance(ep, torch.export.ExportedProgram)
        assert is_unmerged(ep) == (kind == "unmerged")
        programs_to_check = [ep]
        if family == "lora":  # save/load round trip (the same serializer for every method)
            torch.export.save(ep, tmp_path / f"{kind}.pt2")
            programs_to_check.append(torch.export.load(tmp_path / f"{kind}.pt2"))
        for prog in programs_to_check:
            for b, ref in zip(BATCHES, refs):
                assert_close(_logits(prog.module()(**b)), ref, rtol=1e-4, atol=1e-5, what=f"{method} {kind} {tuple(b['input_ids'].shape)}")
    if "merged" in programs:
        ep = programs["merged"]
        from adapt_compiler.capture import _dynamic_shapes

        plain = torch.export.export(base, (), BATCHES[0], strict=False,
                                    dynamic_shapes=_dynamic_shapes(base, (), BATCHES[0]))
        assert set(ep.state_dict) == set(plain.state_dict), "merged program must have the base's parameters only"
        assert _op_counts(ep) == _op_counts(plain), "merged program must be the base architecture's graph"
    # the unmerged program carries the base once, under its own names, plus the adapter tensors
    un = programs["unmerged"]
    assert set(adapter_constants(m)) <= set(un.state_dict) | set(un.constants)
    base_names = {n for n, _ in [*base.named_parameters(), *base.named_buffers()]}
    assert {k for k in un.state_dict if not k.startswith("ac_")} <= base_names


@pytest.mark.real_capture
def test_export_leaves_the_module_and_model_as_they_were(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = _adapted(base, {"default": _spec("lora")[1]}, seed=3)
    m.train()
    adapters = {k: v.clone() for k, v in adapter_constants(m).items()}
    ac.export(m, kwargs=BATCHES[0])
    ep = ac.export(m, kwargs=BATCHES[0], merge=False)
    assert m.training and not m.merged
    assert all(torch.equal(v, adapter_constants(m)[k]) for k, v in adapters.items())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # the program is a snapshot: merging or retraining the module afterwards does not change it
    with torch.no_grad():
        out = ep.module()(**BATCHES[1]).logits
        m.merge()
        _randomize(m, seed=4)
        assert torch.equal(ep.module()(**BATCHES[1]).logits, out)
        m.unmerge()


# -- AOTInductor packages (fresh process, no adapt_compiler) -------------------------------------
def test_merged_package_runs_without_the_library(merged_package, lora):
    path, tmp = merged_package
    report = _run_package(path, tmp, BATCHES)
    assert not any(f.startswith("ac_") for f in report["fqns"])
    for outs, b in zip(report["before"], BATCHES):
        assert_close(outs[0], _ref(lora, b), rtol=1e-4, atol=1e-5, what=f"package {tuple(b['input_ids'].shape)}")
    assert not list(tmp.glob(".*tmp*")), "temporary files left behind"


def test_unmerged_package_swaps_adapters_without_recompiling(combo_package, combo):
    path, tmp = combo_package
    m_a, m_b = combo
    swap = {}
    for name in m_b.active_adapters:
        swap.update(adapter_constants(m_b, name))
    report = _run_package(path, tmp, BATCHES, swap=swap)
    # the package carries every adapter tensor as a constant under its `ac_slots.` name (what the swap loads)
    assert swap and all(k.startswith("ac_slots.") for k in swap), sorted(swap)[:5]
    missing = sorted(set(swap) - set(report["fqns"]))
    assert not missing, f"adapter tensors not among the package's constants: {missing[:5]}"
    for before, after, b in zip(report["before"], report["after"], BATCHES):
        shape = tuple(b["input_ids"].shape)
        assert_close(before[0], _ref(m_a, b), rtol=1e-4, atol=1e-5, what=f"package {sorted(m_a.active_adapters)} {shape}")
        assert_close(after[0], _ref(m_b, b), rtol=1e-4, atol=1e-5, what=f"swapped package {shape}")
        assert (_ref(m_a, b) - _ref(m_b, b)).abs().max() > 1e-3, "the two adapters must differ"


def test_graph_level_package(base, tmp_path):
    """Package 3/3: a graph-level method (no weight form), unmerged, with an adapter swap."""
    method, spec = _spec("graph")
    m_a, m_b = _adapted(base, {"default": spec}, seed=30), _adapted(base, {"default": spec}, seed=31)
    path = ac.package(ac.export(m_a, kwargs=BATCHES[0], merge=False), tmp_path / f"{method}.pt2")
    report = _run_package(path, tmp_path, BATCHES, swap=adapter_constants(m_b))
    for before, after, b in zip(report["before"], report["after"], BATCHES):
        assert_close(before[0], _ref(m_a, b), rtol=1e-4, atol=1e-5, what=f"{method} package")
        assert_close(after[0], _ref(m_b, b), rtol=1e-4, atol=1e-5, what=f"{method} swapped package")


# -- ONNX ----------------------------------------------------------------------------------------
def _onnx_check(m, path):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b in BATCHES:
        out = session.run(None, {k: b[k].numpy() for k in names})[0]
        keep = b["attention_mask"].bool()  # padded query positions have no defined value
        assert_close(torch.from_numpy(np.asarray(out))[keep], _ref(m, b)[keep], rtol=1e-4, atol=1e-5,
                     what=f"onnx {tuple(b['input_ids'].shape)}")


def test_onnx_merged_matches_onnxruntime(combo, tmp_path):
    pytest.importorskip("onnxruntime")
    m = combo[0]
    path = ac.export_onnx(m, (), tmp_path / "combo.onnx", kwargs=BATCHES[0])
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["combo.onnx"]
    _onnx_check(m, path)


def test_onnx_graph_level_matches_onnxruntime(base, tmp_path):
    pytest.importorskip("onnxruntime")
    _, spec = _spec("graph")
    m = _adapted(base, {"default": spec}, seed=40)
    _onnx_check(m, ac.export_onnx(m, (), tmp_path / "graph.onnx", kwargs=BATCHES[0]))


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"input_idz": BATCHES[0]["input_ids"]},
    {"input_ids": BATCHES[0]["input_ids"].float()},
    {"input_ids": BATCHES[0]["input_ids"] + 10_000},
])
def test_bad_example_inputs_are_clear_errors(lora, bad):
    for merge in (True, False):
        with pytest.raises(ac.AdapterError, match="example inputs"):
            ac.export(lora, kwargs=bad, merge=merge)


def test_other_bad_input(lora, base, tmp_path):
    with pytest.raises(ac.AdapterError, match="no tensor"):
        ac.export(lora, kwargs={})
    with pytest.raises(ac.AdapterError, match="AdaptedModule"):
        ac.export(base, kwargs=BATCHES[0])
    with pytest.raises(ac.AdapterError, match="ExportedProgram"):
        ac.package(lora, tmp_path / "x.pt2")
    ep = ac.export(lora, kwargs=BATCHES[0])
    with pytest.raises(ac.AdapterError, match=r"\.pt2"):
        ac.package(ep, tmp_path / "x.zip")
    existing = tmp_path / "exists.pt2"
    existing.write_bytes(b"keep me")
    with pytest.raises(ac.AdapterError, match="already exists"):
        ac.package(ep, existing)
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    with pytest.raises(ac.AdapterError, match="already exists"):
        ac.export_onnx(lora, (), tmp_path / "exists.onnx", kwargs=BATCHES[0])
    assert existing.read_bytes() == b"keep me" and (tmp_path / "exists.onnx").read_bytes() == b"keep me"


def test_failed_package_leaves_nothing_half_written(lora, tmp_path, monkeypatch):
    ep = ac.export(lora, kwargs=BATCHES[0])

    def broken(ep, package_path, **kw):
        Path(package_path).write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(ac.AdapterError, match="compiler crashed"):
        ac.package(ep, tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []


# -- CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(lora, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter") / "lora"
    lora.save_adapter(d)
    return d


def _cli(*argv):
    return cli.main(["export", *map(str, argv)])


def test_cli_exports_a_program_from_a_factory(adapter_dir, lora, tmp_path, capsys):
    out = tmp_path / "ep.pt2"
    assert _cli("--model", "python:models:tiny_llama", "--adapter", adapter_dir, "--format", "ep", "--out", out) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "torch.export" in captured.err  # plain progress lines off a TTY
    ep = torch.export.load(out)
    assert not is_unmerged(ep)
    for b in BATCHES:
        assert_close(_logits(ep.module()(**b)), _ref(lora, b), rtol=1e-4, atol=1e-5, what="cli ep")
    # an existing path is refused, and left alone
    before = out.read_bytes()
    assert _cli("--model", "python:models:tiny_llama", "--adapter", adapter_dir, "--format", "ep", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert _cli("--model", "python:models:tiny_llama", "--adapter", adapter_dir, "--format", "ep", "--no-merge",
                "--out", out, "--force", "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert is_unmerged(torch.export.load(out))


def test_cli_onnx_from_a_config_json(base, adapter_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cfg = tmp_path / "config.json"
    base.config.to_json_file(str(cfg))
    out = tmp_path / "m.onnx"
    assert _cli("--model", cfg, "--adapter", adapter_dir, "--format", "onnx", "--out", out, "--quiet") == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in BATCHES:
        logits = session.run(None, {i.name: b[i.name].numpy() for i in session.get_inputs()})[0]
        assert logits.shape == (*b["input_ids"].shape, base.config.vocab_size)


def test_cli_pt2_wiring(adapter_dir, tmp_path, monkeypatch, capsys):
    """The pt2 format goes through package_program (its compile is covered above; stubbed here)."""
    seen = {}

    def fake(ep, package_path, inductor_configs=None, **kw):
        seen["ep"] = ep
        Path(package_path).write_bytes(b"pt2")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake)
    out = tmp_path / "model.pt2"
    assert _cli("--model", "python:models:tiny_llama", "--adapter", adapter_dir, "--out", out, "--quiet") == 0
    assert out.read_bytes() == b"pt2" and isinstance(seen["ep"], torch.export.ExportedProgram)


def bad_inputs():
    return {"input_ids": torch.rand(2, 5)}


def test_cli_errors(adapter_dir, tmp_path, capsys):
    out = tmp_path / "x.pt2"
    # an adapter that does not fit the model (other hidden size)
    small = tmp_path / "small"
    other = ac.compile(tiny_llama(hidden=32, heads=2, kv_heads=1), ac.LoRA(r=4, targets=["q_proj", "v_proj"]),
                       lowering="eager")
    other.save_adapter(small)
    assert _cli("--model", "python:models:tiny_llama", "--adapter", small, "--format", "ep", "--out", out) == 2
    assert "does not fit" in capsys.readouterr().err
    # bad example inputs
    assert _cli("--model", "python:models:tiny_llama", "--adapter", adapter_dir, "--format", "ep", "--out", out,
                "--inputs", "python:test_export:bad_inputs") == 2
    assert "example inputs" in capsys.readouterr().err
    # a model reference that does not resolve
    assert _cli("--model", "python:models:no_such_factory", "--adapter", adapter_dir, "--out", out) == 2
    assert "no attribute" in capsys.readouterr().err
    assert not out.exists()
