"""The PeftModel surface (integrations/), against PEFT 0.21.2 where PEFT has the same member.

Trainer/TRL runs that use these members are in tests/test_trainer.py and tests/test_trl.py; here
each member's meaning is checked directly, plus what a drop-in needs beyond them: the per-model
class (isinstance, signature, pickling), dtype/device moves, and working without PEFT installed.
"""

from __future__ import annotations

import copy
import inspect
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import adapt_compiler as ac
from adapt_compiler.counters import COUNTERS
from adapt_compiler.errors import AdapterAttributeError
from models import tiny_llama, token_batch
from oracle import assert_close, compare_grads, logits_of, ours_from_peft, peft_pair, peft_twin, randomize_

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj"]
SPEC = ac.LoRA(r=4, alpha=8, targets=TARGETS)


def _peft_cfg(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


@pytest.fixture(scope="module")
def pair():
    pm, m = peft_pair(tiny_llama(), _peft_cfg(), SPEC, keys=("lora_",))
    return pm.eval(), m.eval()


def test_a_peft_model_with_the_models_forward_signature(pair):
    from transformers.utils.generic import find_labels

    _, m = pair
    model = m.get_base_model()
    assert isinstance(m, peft.PeftModel) and isinstance(m, ac.AdaptedModule)
    assert type(m).__name__ == "AdaptedLlamaForCausalLM"
    theirs = inspect.signature(type(m.table.model).forward).parameters
    ours = inspect.signature(m.forward).parameters
    assert [p for p in ours if p != "adapter_names"] == [p for p in theirs if p != "self"]
    assert ours["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert find_labels(type(m)) == find_labels(type(model)) == ["labels"]
    assert type(ac.compile(tiny_llama(seed=1), SPEC, lowering="eager")) is type(m), "one class per model class"


def test_counting_matches_peft(pair, capsys):
    pm, m = pair
    m.print_trainable_parameters()
    pm.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.splitlines()
    assert ours == theirs and ours.startswith("trainable params: 1,792 ||")
    assert m.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    for kw in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
        assert m.num_parameters(**kw) == pm.num_parameters(**kw), kw


def test_peft_config_add_adapter_and_selection():
    m = ac.compile(tiny_llama(), SPEC, lowering="eager")
    cfg = m.peft_config["default"]
    assert isinstance(cfg, peft.LoraConfig) and (cfg.r, cfg.lora_alpha) == (4, 8) and not cfg.inference_mode
    assert set(cfg.target_modules) == set(TARGETS) and m.active_adapter == "default"
    m.add_adapter("ref", cfg)  # TRL's DPO: a frozen copy of the adapter's config
    assert m.state.specs["ref"] == m.state.specs["default"].replace(targets=m.state.specs["ref"].targets)
    assert m.active_adapters == ("default",) and m.peft_config["ref"].inference_mode
    names = {n for n, _ in m.named_parameters() if ".ref." in n}
    assert names == {n.replace(".default.", ".ref.") for n, _ in m.named_parameters() if ".default." in n}
    m.set_adapter("ref", inference_mode=True)
    assert m.active_adapter == "ref" and not any(p.requires_grad for p in m.parameters())
    m.set_requires_grad("ref")
    assert all(p.requires_grad for n, p in m.named_parameters() if ".ref." in n)
    assert m.modules_to_save is None and m.has_active_enabled_adapter
    with m.disable_adapter():
        assert not m.has_active_enabled_adapter
        with m.disable_adapter():
            pass
        assert not m.adapters_enabled, "an inner disable_adapter() leaves the outer one in force"
    assert m.adapters_enabled


def test_save_pretrained_writes_peft_layout(tmp_path):
    base = tiny_llama()
    m = ac.compile(base, {"default": SPEC, "other": ac.LoRA(r=2, targets=["k_proj"])}, lowering="eager")
    randomize_(m, ("lora_",))
    m.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "adapter_config.json").is_file()
    assert (tmp_path / "both" / "other" / "adapter_model.safetensors").is_file()
    assert "library_name: peft" in (tmp_path / "both" / "README.md").read_text()
    batch = token_batch()
    with torch.no_grad():
        want = m.eval()(**batch).logits
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both").eval()
        assert_close(pm(**batch).logits, want, what="PeftModel.from_pretrained(save_pretrained dir)")
    m.save_pretrained(tmp_path / "sel", selected_adapters=["other"])  # PEFT: non-default names in a subdir
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["README.md", "other"]
    m.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    for bad, match in (({"safe_serialization": False}, "safe_serialization"), ({"state_dict": {}}, "state_dict"),
                       ({"selected_adapters": ["nope"]}, "nope"), ({"save_embedding_layers": True}, "embedding")):
        with pytest.raises(ac.AdapterError, match=match):
            m.save_pretrained(tmp_path / "bad", **bad)


def test_load_adapter_overwrites_in_place_with_peft_meaning(tmp_path):
    trained = ac.compile(tiny_llama(), SPEC, lowering="eager")
    randomize_(trained, ("lora_",))
    trained.save_pretrained(tmp_path / "ckpt")
    m = ac.compile(tiny_llama(), SPEC, lowering="eager").train()
    live = dict(m.named_parameters())
    m.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)  # Trainer's resume
    after = dict(m.named_parameters())
    assert all(after[n] is live[n] for n in live), "the same tensor objects (the optimizer's) were loaded into"
    for n, p in trained.named_parameters():
        assert torch.equal(after[n], p)
    assert m.training and all(p.requires_grad for p in m.adapter_parameters())
    m.load_adapter(tmp_path / "ckpt", "frozen")  # PEFT: new adapters are frozen unless is_trainable; eval()
    assert not m.training and not any(p.requires_grad for n, p in m.named_parameters() if ".frozen." in n)
    m.load_adapter(tmp_path / "ckpt", "trainable", is_trainable=True)
    assert all(p.requires_grad for n, p in m.named_parameters() if ".trainable." in n)
    ac.compile(tiny_llama(), ac.LoRA(r=8, targets=TARGETS), lowering="eager").save_pretrained(tmp_path / "r8")
    with pytest.raises(ac.AdapterError, match="r differ"):
        m.load_adapter(tmp_path / "r8", "default")
    with pytest.raises(ac.AdapterError, match="key_mapping"):
        m.load_adapter(tmp_path / "ckpt", "x", key_mapping={"a": "b"})
    assert "x" not in m.state.specs


def test_merge_and_unload_is_a_merged_copy(pair):
    pm, m = pair
    batch = token_batch()
    user = m.table.model
    before = {k: v.clone() for k, v in user.state_dict().items()}
    merged = m.merge_and_unload(safe_merge=True)
    assert type(merged) is type(user) and merged is not user
    with torch.no_grad():
        assert_close(merged(**batch).logits, copy.deepcopy(pm).merge_and_unload()(**batch).logits)
    assert all(torch.equal(v, user.state_dict()[k]) for k, v in before.items()), "your model is untouched"
    assert m.unload() is user
    with pytest.raises(ac.AdapterError, match="set_adapter"):
        m.merge_and_unload(adapter_names=["other"])


def test_every_inherited_peft_member_is_ours_or_refused(pair):
    """No PeftModel member can run against a model PEFT did not build: each is defined by the
    AdaptedModule side or is a stub that refuses (hasattr() is False for blocked properties)."""
    _, m = pair
    cls = type(m)
    members = {n for c in peft.PeftModel.__mro__ if c not in (nn.Module, object) for n in vars(c)
               if not (n.startswith("__") and n.endswith("__"))}
    assert {"generate", "get_base_model", "save_pretrained", "merge_and_unload"} - members == {"merge_and_unload"}
    for name in sorted(members):
        ours = inspect.getattr_static(cls, name)
        owner = next(c for c in cls.__mro__ if name in vars(c))
        assert owner not in peft.PeftModel.__mro__, f"{name} resolves to {owner.__name__}'s"
    assert inspect.getattr_static(cls, "generate").__qualname__.startswith("GenerationSupport.")  # ours, not a stub
    with pytest.raises(ac.AdapterError, match="ac.compile"):
        cls.from_pretrained(tiny_llama(), "somewhere")
    with pytest.raises(ac.AdapterError, match="report"):
        m.get_layer_status()


def test_attributes_read_through_but_never_to_an_unadapted_module(pair):
    _, m = pair
    user = m.table.model
    assert m.loss_type == user.loss_type and m.name_or_path == user.name_or_path
    assert m.config is user.config and m.main_input_name == "input_ids"
    with pytest.raises(AdapterAttributeError, match="without the adapters"):
        m.model
    assert not hasattr(m, "lm_head") and not hasattr(m, "resize_token_embeddings")
    assert not hasattr(m, "no_such_thing")
    m.add_model_tags(["mine"])
    assert "mine" in m.model_tags and "mine" not in (user.model_tags or [])


def test_get_base_model_is_the_adapted_model_not_yours(pair):
    pm, m = pair
    view = m.get_base_model()
    assert view is not m.table.model and view is m.get_base_model() and m.base_model.model is view
    assert view._get_name() == m._get_name() == "LlamaForCausalLM"
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(view(**batch).logits, m(**batch).logits)
        hidden = view.base_model(**batch).last_hidden_state  # the adapted backbone (TRL's fused LM head)
        assert_close(hidden, pm.get_base_model().model(**batch).last_hidden_state, what="adapted backbone")
    head = view.get_output_embeddings()
    assert head.weight is m.table.frozen["lm_head.weight"]
    on_head = ac.compile(tiny_llama(), ac.LoRA(r=2, targets=["lm_head"]), lowering="eager")
    with pytest.raises(ac.AdapterError, match="lm_head"):
        on_head.get_base_model().get_output_embeddings()


def test_torch_save_load_and_deepcopy(tmp_path):
    base = tiny_llama()
    m = ac.compile(base, SPEC, lowering="eager").train()
    randomize_(m, ("lora_",))
    batch = token_batch(labels=True)
    m(**batch).loss.backward()  # graphs exist: they are not pickled
    want = [p.grad.clone() for p in m.adapter_parameters()]
    m.zero_grad()
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    clone = copy.deepcopy(m)
    for other in (loaded, clone):
        assert type(other) is type(m) and isinstance(other, peft.PeftModel)
        other(**batch).loss.backward()
        for g, p in zip(want, other.adapter_parameters()):
            assert torch.equal(g, p.grad)
        q = other.table.frozen["model.layers.0.self_attn.q_proj.weight"]
        assert q.data_ptr() == other.table.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
        assert q.data_ptr() != base.model.layers[0].self_attn.q_proj.weight.data_ptr()
    with torch.no_grad():  # independent: changing the copy changes nothing of the original
        for p in clone.adapter_parameters():
            p.add_(1.0)
        clone.table.frozen["lm_head.weight"].add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(m.adapter_parameters(), loaded.adapter_parameters()))
    assert not torch.equal(base.lm_head.weight, clone.table.model.lm_head.weight)
    buf = io.BytesIO()
    import pickle

    pickle.dump(m, buf)
    assert type(pickle.loads(buf.getvalue())) is type(m)


def _cpu_runs(dtype) -> bool:
    try:
        a = torch.randn(4, 4).to(dtype)
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
        return True
    except RuntimeError:
        return False


# (spelling, move, dtype, first call before the move?): each spelling once, each dtype once after a call
MOVES = [("to(bfloat16)", lambda x: x.to(torch.bfloat16), torch.bfloat16, True),
         ("bfloat16()", lambda x: x.bfloat16(), torch.bfloat16, False),
         ("double()", lambda x: x.double(), torch.float64, True),
         ("to(float64)", lambda x: x.to(torch.float64), torch.float64, False)]
if _cpu_runs(torch.float16):
    MOVES += [("half()", lambda x: x.half(), torch.float16, True)]
TOL = {torch.bfloat16: dict(rtol=2e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3),
       torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("what,move,dtype,called", MOVES, ids=[m[0] for m in MOVES])
def test_dtype_moves_match_peft_in_that_dtype(what, move, dtype, called):
    """The frozen base, the adapters and the graphs move (re-captured at the new dtype), before or
    after the first call; PEFT's model moved the same way is the reference."""
    base = tiny_llama()
    pm = peft_twin(base, _peft_cfg())
    randomize_(pm, ("lora_",))
    m = ours_from_peft(base, pm, SPEC)
    pm.train(), m.train()
    batch = token_batch(labels=True)
    if called:
        m(**batch).loss.backward()
        m.zero_grad()
    assert move(m) is m and move(pm) is pm
    assert m.dtype == dtype and all(p.dtype == dtype for p in m.adapter_parameters())
    assert base.lm_head.weight.dtype == torch.float32, "your model does not move"
    ours, theirs = m(**batch), pm(**batch)
    assert ours.logits.dtype == theirs.logits.dtype == dtype
    assert_close(ours.logits, theirs.logits, what=f"{what} logits", **TOL[dtype])
    ours.loss.backward()
    theirs.loss.backward()
    compare_grads(m, pm, **TOL[dtype])


def test_moves_keep_merges_exact_and_same_device_moves_keep_graphs():
    m = ac.compile(tiny_llama(), SPEC, lowering="eager").eval()
    randomize_(m, ("lora_",))
    batch = token_batch()
    m(**batch)
    before = COUNTERS["captures"]
    m.to("cpu")  # Trainer moves the model to its device: nothing to capture again
    m(**batch)
    assert COUNTERS["captures"] == before
    original = m.table.frozen["model.layers.0.self_attn.q_proj.weight"].detach().clone()
    m.merge()
    m.double()
    m.unmerge()
    assert torch.equal(m.table.frozen["model.layers.0.self_attn.q_proj.weight"], original.double())


def test_works_without_peft_installed(tmp_path):
    """A fresh interpreter where `import peft` fails: no PeftModel base, everything else works."""
    script = textwrap.dedent(f"""
        import sys, copy, torch
        sys.modules["peft"] = None  # import peft raises ImportError
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import adapt_compiler as ac
        from models import tiny_llama, token_batch
        m = ac.compile(tiny_llama(), ac.LoRA(r=4, targets=["q_proj"]), lowering="eager").train()
        assert type(m).__name__ == "AdaptedLlamaForCausalLM"
        assert not any(c.__name__ == "PeftModel" for c in type(m).__mro__)
        m(**token_batch(labels=True)).loss.backward()
        assert m.peft_config["default"]["peft_type"] == "LORA"
        m.save_pretrained({str(tmp_path / "dir")!r})
        m2 = copy.deepcopy(m)
        torch.save(m, {str(tmp_path / "m.pt")!r})
        assert type(torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)) is type(m)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert (tmp_path / "dir" / "adapter_config.json").is_file()


def test_compile_takes_a_peft_config_as_peft_does():
    """ac.compile(model, peft.LoraConfig(...)) means what get_peft_model(model, config) means."""
    cfg = _peft_cfg(lora_dropout=0.0, rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    base = tiny_llama()
    pm = peft_twin(base, cfg)
    randomize_(pm, ("lora_",))
    m = ac.compile(base, cfg, lowering="eager")
    assert m.peft_config["default"].rank_pattern == cfg.rank_pattern
    m.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    batch = token_batch()
    assert_close(logits_of(m(**batch)), logits_of(pm(**batch)))
    named = ac.compile(base, {"mine": cfg}, lowering="eager")
    assert list(named.active_adapters) == ["mine"]
