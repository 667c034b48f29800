"""Nothing lost: atomic checkpoints, bit-exact merge/unmerge, and a user model that never changes.

* save_adapter stages every file and renames only when all are written: an interrupted save (an error
  or a KeyboardInterrupt while writing the weights or the config) leaves the previous checkpoint intact.
* merge -> unmerge restores every base weight bit for bit, for every mergeable registered method,
  and 100 rounds drift by zero bits (each merge is bit-identical to the first).
* The user's model (state_dict bits, requires_grad flags, training flags, .grad) is bit-identical after
  any sequence of compile, train, merge, unmerge, export, save/load and errors (hypothesis-drawn).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapt_compiler as ac
from adapt_compiler import checkpoint
from adapt_compiler.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from adapt_compiler.passes import METHODS
from test_bad_input import assert_same, snapshot
from test_properties import FACTORIES, export_module, mergeable, randomize_adapter_, weight_methods


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# -- interrupted saves ---------------------------------------------------------------------------------------
def _module(r=2, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    return base, ac.compile(base, ac.LoRA(r=r, alpha=4, targets=["0", "2"], init=False), lowering="eager")


def _fail_write(monkeypatch, exc, file_name: str, nth: int = 1):
    """The `nth` staged write of a `file_name` file (WEIGHTS_NAME or CONFIG_NAME) is cut off half-way,
    then raises `exc`. save_adapter stages every file through `checkpoint._write_temp(path, write)`,
    which is patched where save_adapter looks it up (whatever library does the writing)."""
    real, calls = checkpoint._write_temp, []

    def staged(path, write):
        if path.name == file_name:
            calls.append(path)
            if len(calls) == nth:
                def half_written(tmp):
                    write(tmp)
                    Path(tmp).write_bytes(Path(tmp).read_bytes()[:20])
                    raise exc

                return real(path, half_written)
        return real(path, write)

    monkeypatch.setattr(checkpoint, "_write_temp", staged)
    return calls


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("where", ["weights", "config"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where, exc):
    _, m = _module()
    d = tmp_path / "ckpt"
    m.save_adapter(d)
    before = _files(d)
    # the new save differs in weights *and* config (another adapter of another rank under the same dir)
    _, m2 = _module(r=3, seed=1)
    calls = _fail_write(monkeypatch, exc, WEIGHTS_NAME if where == "weights" else CONFIG_NAME)
    with pytest.raises(type(exc)):
        m2.save_adapter(d)
    monkeypatch.undo()
    assert len(calls) == 1, "the failure was not injected"
    assert _files(d) == before, "the previous checkpoint changed"
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")], "temporary files were left behind"
    m3 = ac.compile(m._model, str(d), lowering="eager")
    for k, v in m.adapter_state_dict().items():
        assert torch.equal(m3.adapter_state_dict()[k], v)


def test_interrupted_save_of_several_adapters_keeps_all(tmp_path, monkeypatch):
    """Two adapters (root + subdir): a failure on the second leaves both previous checkpoints."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    specs = {"a": ac.LoRA(r=2, targets=["0"], init=False), "b": ac.LoRA(r=2, targets=["2"], init=False)}
    m = ac.compile(base, specs, lowering="eager")
    m.save_adapter(tmp_path / "ck")
    before = {p: _files(p) for p in (tmp_path / "ck", tmp_path / "ck" / "b")}
    randomize_adapter_(m, 5)
    calls = _fail_write(monkeypatch, OSError("disk full"), WEIGHTS_NAME, nth=2)  # adapter b's weights
    with pytest.raises(OSError, match="disk full"):
        m.save_adapter(tmp_path / "ck")
    monkeypatch.undo()
    assert [p.parent.name for p in calls] == ["ck", "b"]
    for p, files in before.items():
        assert _files(p) == files, f"{p} changed"


def test_save_load_roundtrip_is_bit_exact_and_peft_loads_it(tmp_path):
    import peft

    base, m = _module()
    randomize_adapter_(m, 3)
    m.save_adapter(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and (tmp_path / "ck" / WEIGHTS_NAME).is_file()
    m2 = ac.compile(base, str(tmp_path / "ck"), lowering="eager")
    sd, sd2 = m.adapter_state_dict(), m2.adapter_state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(4, 6)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ck")).eval()
    torch.testing.assert_close(m(x), pm(x), rtol=1e-5, atol=1e-6)


# -- merge / unmerge -------------------------------------------------------------------------------------------
def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("name", [n for n in weight_methods() if n in FACTORIES])
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_merge_unmerge_bit_exact_100_rounds(name, data):
    case = FACTORIES[name](data.draw)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(case.d_in, case.d_out), nn.Tanh(), nn.Linear(case.d_out, case.d_in)).eval()
    user = {k: _bits(v) for k, v in base.state_dict().items()}
    m = ac.compile(base, case.spec.replace(targets=["0"]), lowering="eager").eval()
    randomize_adapter_(m, 7)
    if not mergeable(name):  # a method without a weight form refuses, and changes nothing
        with pytest.raises(ac.AdapterError, match="cannot be merged"):
            m.merge()
        assert all(torch.equal(_bits(v), user[k]) for k, v in base.state_dict().items())
        return
    originals = {k: _bits(v) for k, v in m.base.state_dict().items()}
    ids = {k: id(v) for k, v in m.base.named_parameters()}
    m.merge()
    first = {k: _bits(v) for k, v in m.base.state_dict().items()}
    assert any(not torch.equal(first[k], originals[k]) for k in first), f"{name}: merge changed nothing"
    m.unmerge()
    for _ in range(100):
        m.merge()
        now = {k: _bits(v) for k, v in m.base.state_dict().items()}
        assert all(torch.equal(now[k], first[k]) for k in first), f"{name}: a merge differs from the first"
        m.unmerge()
        now = {k: _bits(v) for k, v in m.base.state_dict().items()}
        assert all(torch.equal(now[k], originals[k]) for k in originals), f"{name}: unmerge is not bit-exact"
    assert {k: id(v) for k, v in m.base.named_parameters()} == ids, "parameter objects were replaced"
    assert all(torch.equal(_bits(v), user[k]) for k, v in base.state_dict().items()), "the user's model changed"


# -- any sequence of operations leaves the user's model bit-identical ------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(6)
        self.v_proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.v_proj(self.norm(self.drop(self.q_proj(x)))))


OPS = ["train_step", "eval_forward", "merge", "unmerge", "merged_module", "export", "error_load", "error_spec",
       "save_load", "disable", "train_mode", "eval_mode", "add_delete_adapter"]


def _apply(op, m, opt, x, tmp: Path, step: int):
    if op == "train_step":
        if m.merged:
            return
        m.train()
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    elif op == "eval_forward":
        with torch.no_grad():
            m(x)
    elif op == "merge":
        m.merge()
    elif op == "unmerge":
        m.unmerge()
    elif op == "merged_module":
        mm = m.merged_module()
        for p in mm.parameters():  # the copy is the user's to change; that must not reach the original
            p.data.add_(1.0)
    elif op == "export":
        if not m.merged:
            export_module(m, x, merge=True)
    elif op == "error_load":
        with pytest.raises(ac.AdapterError):
            m.load_adapter(tmp / "missing", "other")
    elif op == "error_spec":
        with pytest.raises(ac.AdapterError):
            m.add_adapter("other", ac.LoRA(r=2, targets=["norm"]))
    elif op == "save_load":
        d = tmp / f"ck{step}"
        m.save_adapter(d)
        if not m.merged:
            m.load_adapter(d, "reloaded")
            m.delete_adapter("reloaded")
    elif op == "disable":
        with m.disable_adapters(), torch.no_grad():
            m(x)
    elif op == "train_mode":
        m.train()
    elif op == "eval_mode":
        m.eval()
    elif op == "add_delete_adapter":
        m.add_adapter("extra", ac.LoRA(r=1, targets=["v_proj"]))
        m.delete_adapter("extra")


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=8))
def test_user_model_bit_identical_after_any_sequence(tmp_path_factory, ops):
    torch.manual_seed(0)
    model = Net().eval()
    model.drop.train()  # a submodule in another mode than its parent: its own flag must survive
    before = snapshot(model)
    m = ac.compile(model, ac.LoRA(r=2, targets=["q_proj", "v_proj"], init=False), lowering="eager")
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)
    tmp = tmp_path_factory.mktemp("seq")
    x = torch.randn(4, 6)
    for i, op in enumerate(ops):
        _apply(op, m, opt, x, tmp, i)
        assert_same(before, snapshot(model), f"user model after {ops[: i + 1]}")
    assert all(p.grad is None for p in model.parameters())


def test_real_architecture_sequence(tmp_path):
    """GPT-2 (HF Conv1D, transposed weights; tied wte/lm_head) through train, merge, export, errors."""
    from models import tiny_gpt2, token_batch

    model = tiny_gpt2()
    before = snapshot(model)
    m = ac.compile(model, ac.LoRA(r=2, targets=["c_attn", "c_proj"], init=False), lowering="eager")
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)
    batch = token_batch(labels=True)
    m.train()
    for _ in range(2):
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    y = m(**batch).logits
    m.merge()
    torch.testing.assert_close(m(**batch).logits, y, rtol=1e-4, atol=1e-5)
    m.unmerge()
    assert torch.equal(m(**batch).logits, y)
    ep = ac.export(m, (), {k: v for k, v in batch.items() if k != "labels"}, merge=True)
    del ep
    with pytest.raises(ac.AdapterError):
        ac.compile(model, ac.LoRA(r=2, targets=["c_atn"]))
    with pytest.raises(ac.AdapterError):
        m.load_adapter(tmp_path / "missing", "x")
    m.save_adapter(tmp_path / "ck")
    assert_same(before, snapshot(model), "user GPT-2")
