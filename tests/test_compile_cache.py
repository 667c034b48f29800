"""Warm starts (compile_cache.py): m.save_adapter(dir, compile_cache=True) writes the compile caches next
to the adapter; ac.compile(model, dir, compile_cache=True) in a fresh process loads them when the key
matches and its first step uses them; a stale or corrupt cache is never loaded, and says why.

Slow: one Inductor compile of a tiny Llama training step in this process (module-scoped fixture), one
fresh process that compiles it warm, and one more compile here for a stale cache's step (this
process's Inductor disk cache is warm by then). About 3-4 min on a quiet 2-core machine.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from fresh_process import compile_env
from models import tiny_llama, token_batch
from oracle import adapter_grads_ours, adapter_grads_peft, assert_close

import adapt_compiler as ac
from adapt_compiler import compile_cache
from adapt_compiler.errors import AdapterError

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SPEC = dict(r=4, alpha=8, targets=["q_proj", "v_proj"])


def _module(directory=None, **kw):
    base = tiny_llama(seed=0, layers=2)
    m = ac.compile(base, directory if directory is not None else ac.LoRA(**SPEC), lowering="inductor", **kw)
    m.train()
    return base, m


def _step(m):
    out = m(**token_batch(batch=2, seq=7, labels=True))
    out.loss.backward()
    return out.loss.detach(), {k: g.clone() for k, g in adapter_grads_ours(m).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One compiled training step of a tiny Llama with non-trivial LoRA weights, saved with its cache."""
    base, m = _module()
    _randomise(m)
    loss, grads = _step(m)
    directory = tmp_path_factory.mktemp("warm") / "adapter"
    m.save_adapter(directory, compile_cache=True)
    return {"dir": directory, "base": base, "m": m, "loss": loss, "grads": grads}


def _randomise(m) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _copy(saved, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(saved["dir"], out)
    return out


def _edit_key(directory: Path, edit) -> None:
    key_file = directory / compile_cache.KEY_NAME
    data = json.loads(key_file.read_text())
    edit(data["key"])
    key_file.write_text(json.dumps(data))


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if anything calls torch.compiler.load_cache_artifacts."""
    calls = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: calls.append(data))
    return calls


# -- (1) what a save writes ------------------------------------------------------------------------
def test_save_writes_cache_and_key_and_peft_still_loads_the_directory(saved):
    from peft import PeftModel

    directory = saved["dir"]
    data = (directory / compile_cache.CACHE_NAME).read_bytes()
    key = json.loads((directory / compile_cache.KEY_NAME).read_text())
    assert len(data) > 0 and key["format"] == compile_cache.FORMAT
    assert key["artifacts"].get("inductor", 0) > 0, key["artifacts"]  # Inductor's FX-graph entries are in
    assert key["artifacts"].get("cpp_kernels", 0) > 0, key["artifacts"]  # and, on CPU, the kernels' .so files
    with zipfile.ZipFile(directory / compile_cache.KERNELS_NAME) as z:
        assert all(n.endswith(".so") for n in z.namelist()) and len(z.namelist()) == key["artifacts"]["cpp_kernels"]
    assert key["key"]["torch"] == torch.__version__ and key["key"]["adapters"]["default"]["r"] == 4
    # the guard's verdict on the one compiled graph, recorded for the graph it checked
    gm = saved["m"].latest_graph()
    assert gm.meta["ac_guard"].status == "passed"
    assert list(key["verdicts"]) == [gm.meta["ac_guard_fingerprint"]]
    record = key["verdicts"][gm.meta["ac_guard_fingerprint"]]
    assert record["status"] == "passed" and record["compared"] == gm.meta["ac_guard"].compared > 0
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", compile_cache.CACHE_NAME, compile_cache.KERNELS_NAME,
         compile_cache.KEY_NAME])
    # PEFT reads the directory as before and computes the step we compiled (loss and every adapter grad)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(saved["base"]), str(directory), is_trainable=True).train()
    out = peft_model(**token_batch(batch=2, seq=7, labels=True))
    out.loss.backward()
    assert_close(saved["loss"], out.loss, what="loss vs PEFT")
    theirs = adapter_grads_peft(peft_model)
    assert set(theirs) == set(saved["grads"]) and theirs
    for k, grad in saved["grads"].items():
        assert grad.abs().max() > 0, k
        assert_close(grad, theirs[k], what=f"grad {k} vs PEFT")


# -- (2) a fresh process starts warm -----------------------------------------------------------------
# the cold process, as a user's first run: nothing of other tests in it (after some of them in one pytest
# process, the warm child below ran the full check instead of reusing the verdict; not understood yet)
SAVER = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import test_compile_cache as t
base, m = t._module()
t._randomise(m)
loss, grads = t._step(m)
m.save_adapter(sys.argv[2], compile_cache=True)
torch.save({"loss": loss, "grads": grads, "compared": m.latest_graph().meta["ac_guard"].compared}, sys.argv[3])
"""

CHILD = r"""
import json, sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
import test_compile_cache as t
from torch._dynamo.utils import counters
runs = t._count_guard_runs()
base, m = t._module(sys.argv[2], compile_cache=True)
loss, grads = t._step(m)
(what, verdict), = m._checks()
m.save_adapter(sys.argv[4], compile_cache=True)  # saved again from the warm process: the verdict carries over
resaved = json.loads(open(sys.argv[4] + "/compile_cache.json").read())["verdicts"]
torch.save({"loss": loss, "grads": grads, "line": m.report().compile_cache, "report": str(m.report()),
            "verdict": (verdict.status, verdict.source, verdict.compared), "guard_runs": runs[0], "resaved": resaved,
            "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd")}}, sys.argv[3])
"""


def _count_guard_runs(monkeypatch=None) -> list:
    """Counts the guard's runs of a graph (the eager reference and each candidate): 2 for a full check of a
    first call, 1 when a saved verdict is reused (the compiled call alone). Patched for the test (or for
    the child process's life)."""
    from adapt_compiler.lowering import guard

    runs, real = [0], guard._run

    def counting(*args, **kwargs):
        runs[0] += 1
        return real(*args, **kwargs)

    if monkeypatch is None:
        guard._run = counting
    else:
        monkeypatch.setattr(guard, "_run", counting)
    return runs


def _fresh_process(script: str, cache_dir: Path, *args) -> None:
    """`script` in a new Python process whose Inductor cache directory is `cache_dir` (created empty)."""
    cache_dir.mkdir()
    env = compile_env(cache_dir, [TESTS.parent, *filter(None, [os.environ.get("PYTHONPATH")])],
                      threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fresh_process_loads_the_cache_and_its_first_step_uses_it(tmp_path):
    directory, cold = tmp_path / "adapter", tmp_path / "cold.pt"
    _fresh_process(SAVER, tmp_path / "inductor_cold", directory, cold)
    saved = {"dir": directory, **torch.load(cold)}
    cache_dir, out = tmp_path / "inductor", tmp_path / "child.pt"  # nothing compiled on disk for this process
    _fresh_process(CHILD, cache_dir, saved["dir"], out, tmp_path / "again")
    got = torch.load(out)
    assert got["line"].startswith("compile cache: loaded ") and str(saved["dir"]) in got["line"], got["line"]
    restored = {p.relative_to(cache_dir).as_posix() for p in cache_dir.glob("??/*.so")}
    with zipfile.ZipFile(saved["dir"] / compile_cache.KERNELS_NAME) as z:
        assert set(z.namelist()) <= restored  # the kernels were unpacked where Inductor looks for them
    hits = got["counters"]["inductor"].get("fxgraph_cache_hit", 0) + got["counters"]["aot_autograd"].get(
        "autograd_cache_hit", 0)
    assert hits > 0, got["counters"]  # its graphs came from the artifacts, not a fresh compile
    assert got["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0, got["counters"]
    # the guard's verdict came with the cache: the same compiled code was checked on the same graph (a
    # fingerprint computed in this fresh process matched the saved one), so no eager reference ran
    assert got["verdict"] == ("reused", str(saved["dir"]), saved["compared"])
    assert got["guard_runs"] == 1
    assert f"guard: verdict reused from {saved['dir']}" in got["report"]
    assert "1 guard verdicts" in got["line"]
    assert got["resaved"] == json.loads((saved["dir"] / compile_cache.KEY_NAME).read_text())["verdicts"]
    assert_close(got["loss"], saved["loss"], rtol=0, atol=1e-6, what="warm loss")
    assert set(got["grads"]) == set(saved["grads"])
    for k in saved["grads"]:
        assert_close(got["grads"][k], saved["grads"][k], rtol=1e-6, atol=1e-8, what=f"warm grad {k}")


# -- (3) a stale cache is never loaded -------------------------------------------------------------
def test_stale_torch_version_is_ignored_with_the_reason_and_the_step_is_still_right(saved, tmp_path, no_load,
                                                                                  monkeypatch):
    directory = _copy(saved, tmp_path)
    _edit_key(directory, lambda k: k.update(torch="2.12.0"))
    with pytest.warns(compile_cache.CompileCacheWarning, match="made for torch 2.12.0"):
        _, m = _module(directory, compile_cache=True)
    line = m.report().compile_cache
    assert "ignored: made for torch 2.12.0, this is torch " + torch.__version__ in line
    assert "ignored" in str(m.report())
    assert no_load == []
    runs = _count_guard_runs(monkeypatch)
    loss, grads = _step(m)  # compiled here without the cache: same numbers
    assert_close(loss, saved["loss"], what="loss")
    for k in saved["grads"]:
        assert_close(grads[k], saved["grads"][k], what=f"grad {k}")
    # a mismatched key brings no verdict: the guard checked this graph against eager again
    (_, verdict), = m._checks()
    assert verdict.status == "passed" and verdict.source is None and runs[0] == 2
    assert m.table.verified == {} and "verdict reused" not in str(m.report())


@pytest.mark.parametrize("edit, reason", [
    (lambda k: k["adapters"]["default"].update(r=8), "another spec of adapter 'default' (r 8 -> 4)"),
    (lambda k: k["code"].update(passes="0" * 16), "other adapt_compiler code (changed: passes)"),
    (lambda k: k["model"]["config"].update(num_hidden_layers=8), "another model config (num_hidden_layers 8 -> 2)"),
    (lambda k: k["model"].update(dtypes=["torch.bfloat16"]), "made for a model in ['torch.bfloat16']"),
    (lambda k: k["options"].update(lowering="regional"), "compile options"),
], ids=["rank", "method-code", "model-config", "dtype", "lowering"])
def test_stale_key_is_ignored_with_the_reason(saved, tmp_path, no_load, edit, reason):
    directory = _copy(saved, tmp_path)
    _edit_key(directory, edit)
    with pytest.warns(compile_cache.CompileCacheWarning):
        _, m = _module(directory, compile_cache=True)
    assert reason in m.report().compile_cache and "ignored" in m.report().compile_cache
    assert no_load == []


def test_key_changes_with_the_spec_and_the_model():
    _, a = _module()
    key = compile_cache.cache_key(a.table, a._compile_options())
    b = ac.compile(tiny_llama(seed=0, layers=2), ac.LoRA(**{**SPEC, "r": 8}), lowering="inductor")
    c = ac.compile(tiny_llama(seed=0, layers=3), ac.LoRA(**SPEC), lowering="inductor")
    d = ac.compile(tiny_llama(seed=0, layers=2).double(), ac.LoRA(**SPEC), lowering="inductor")
    assert compile_cache.cache_key(b.table, b._compile_options())["adapters"] != key["adapters"]
    assert compile_cache.cache_key(c.table, c._compile_options())["model"] != key["model"]
    assert compile_cache.cache_key(d.table, d._compile_options())["model"]["dtypes"] == ["torch.float64"]
    assert compile_cache.cache_key(a.table, a._compile_options()) == key  # and is stable


# -- (3b) the guard's saved verdict serves only the identical compiled code ---------------------------
def _warm_step(directory, monkeypatch, context=None):
    """A module from `directory` with its cache loaded, in this process (its Inductor caches hold the
    fixture's graphs), and its first step (inside `context`): (module, loss, grads, guard runs)."""
    runs = _count_guard_runs(monkeypatch)
    _, m = _module(directory, compile_cache=True)
    with context if context is not None else contextlib.nullcontext():
        loss, grads = _step(m)
    return m, loss, grads, runs[0]


def _assert_same_step(saved, loss, grads):
    assert_close(loss, saved["loss"], what="loss")
    for k in saved["grads"]:
        assert_close(grads[k], saved["grads"][k], what=f"grad {k}")


def test_saved_verdict_is_reused_for_the_same_graph_from_the_cache(saved, tmp_path, monkeypatch):
    m, loss, grads, runs = _warm_step(_copy(saved, tmp_path), monkeypatch)
    (_, verdict), = m._checks()
    assert verdict.status == "reused" and runs == 1
    _assert_same_step(saved, loss, grads)


def test_saved_verdict_for_another_graph_is_not_reused(saved, tmp_path, monkeypatch):
    """The key matches, but the verdict was recorded for another graph (its fingerprint): checked again."""
    directory = _copy(saved, tmp_path)
    key_file = directory / compile_cache.KEY_NAME
    data = json.loads(key_file.read_text())
    data["verdicts"] = {"0" * 32: next(iter(data["verdicts"].values()))}
    key_file.write_text(json.dumps(data))
    m, loss, grads, runs = _warm_step(directory, monkeypatch)
    (_, verdict), = m._checks()
    assert m.table.verified and verdict.status == "passed" and verdict.source is None and runs == 2
    _assert_same_step(saved, loss, grads)


def test_saved_verdict_is_not_reused_when_inductor_compiles_anew(saved, tmp_path, monkeypatch):
    """Same key, same graph, but a setting outside our key changes torch's cache keys (a cache-key tag, new
    for each run, so nothing on disk matches): the compiled code is new (a cache miss), so its first call
    is checked against eager, and the numbers are those of a full check (the candidate's first run is
    dropped, the state restored)."""
    tag = torch.compiler.config.patch(cache_key_tag=f"ac-test-{uuid.uuid4().hex}")
    m, loss, grads, runs = _warm_step(_copy(saved, tmp_path), monkeypatch, tag)
    (_, verdict), = m._checks()
    assert verdict.status == "passed" and runs == 3  # the dropped compiled call, the reference, the candidate
    assert "not reused: Inductor compiled this graph anew" in verdict.note
    assert "not reused" in str(m.report())
    _assert_same_step(saved, loss, grads)


# -- (4) bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / compile_cache.CACHE_NAME).write_bytes(b"not a cache"), "does not match the checksum"),
    (lambda d: (d / compile_cache.KEY_NAME).write_text("{broken"), "not readable JSON"),
    (lambda d: (d / compile_cache.KEY_NAME).unlink(), "no compile_cache.json"),
    (lambda d: (d / compile_cache.KERNELS_NAME).write_bytes(b"PK"), "compile_cache.kernels does not match"),
    (lambda d: (d / compile_cache.KERNELS_NAME).unlink(), "compile_cache.kernels is missing"),
], ids=["corrupt-bin", "corrupt-key", "no-key", "corrupt-kernels", "no-kernels"])
def test_corrupt_cache_is_ignored_not_a_crash(saved, tmp_path, no_load, damage, reason):
    directory = _copy(saved, tmp_path)
    damage(directory)
    with pytest.warns(compile_cache.CompileCacheWarning):
        _, m = _module(directory, compile_cache=True)
    assert reason in m.report().compile_cache
    assert no_load == []


def test_kernel_archive_entries_outside_inductors_names_are_refused(saved, tmp_path, monkeypatch):
    """A kernel archive is unpacked into Inductor's cache dir only under Inductor's own file names (no
    '../', no other files), even when its checksum matches; the cache is then ignored, not a crash."""
    directory = _copy(saved, tmp_path)
    with zipfile.ZipFile(directory / compile_cache.KERNELS_NAME, "a") as z:
        z.writestr("../evil.so", b"x")
    _edit_key_sums(directory)
    target = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(target))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: None)
    with pytest.warns(compile_cache.CompileCacheWarning, match="unexpected entry '../evil.so'"):
        _, m = _module(directory, compile_cache=True)
    assert "ignored" in m.report().compile_cache
    assert not (tmp_path / "evil.so").exists()


def _edit_key_sums(directory: Path) -> None:
    import hashlib

    key_file = directory / compile_cache.KEY_NAME
    data = json.loads(key_file.read_text())
    data["sha256"] = {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in data["sha256"]}
    key_file.write_text(json.dumps(data))


def test_cache_is_loaded_only_when_asked(saved, no_load):
    with warnings.catch_warnings():
        warnings.simplefilter("error", compile_cache.CompileCacheWarning)
        _, m = _module(saved["dir"])
    assert "not loaded" in m.report().compile_cache and "compile_cache=True" in m.report().compile_cache
    assert no_load == []


def test_a_loaded_cache_starts_only_the_isa_probe(saved, tmp_path, monkeypatch):
    """Its kernels are restored, not compiled: the CPU set-up thread (lowering/prewarm.py) skips the
    trivial kernel that builds Inductor's precompiled header. A cache that is not loaded (not trusted)
    leaves the kernels to compile, so the thread compiles that kernel too."""
    calls = []
    monkeypatch.setattr("adapt_compiler.module.start_cpu_setup", lambda kernels=True: calls.append(kernels))
    _module(_copy(saved, tmp_path), compile_cache=True)
    _module(saved["dir"])
    assert calls == [False, True]


def test_bad_compile_cache_arguments_are_refused_by_name(saved, tmp_path):
    m = saved["m"]
    with pytest.raises(AdapterError, match="compile_cache='yes' must be True or False"):
        m.save_adapter(tmp_path / "a", compile_cache="yes")
    with pytest.raises(AdapterError, match="compile_cache=1 must be True or False"):
        ac.compile(tiny_llama(), saved["dir"], compile_cache=1)
    with pytest.raises(AdapterError, match="spec must be that directory"):
        ac.compile(tiny_llama(), ac.LoRA(**SPEC), compile_cache=True)
    with pytest.raises(AdapterError, match="a kohya file has no room"):
        m.save_adapter(tmp_path / "a.safetensors", format="kohya", compile_cache=True)
    eager = ac.compile(tiny_llama(), ac.LoRA(**SPEC), lowering="eager")
    with pytest.raises(AdapterError, match="lowering='eager', which compiles nothing"):
        eager.save_adapter(tmp_path / "b", compile_cache=True)
    fresh = ac.compile(tiny_llama(), ac.LoRA(**SPEC), lowering="inductor")
    with pytest.raises(AdapterError, match="nothing compiled yet"):
        fresh.save_adapter(tmp_path / "c", compile_cache=True)
    assert not any((tmp_path / n).exists() for n in ("a", "a.safetensors", "b", "c"))


def test_failed_save_leaves_no_half_written_cache(saved, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    saved["m"].save_adapter(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real = Path.write_bytes

    def fail_on_cache(self, data):
        if compile_cache.CACHE_NAME in self.name:
            real(self, data[: len(data) // 2])
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_cache)
    with pytest.raises(OSError, match="disk full"):
        saved["m"].save_adapter(directory, compile_cache=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no cache, no temp file
