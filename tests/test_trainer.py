"""transformers.Trainer trains an AdaptedModule as it trains a PeftModel (integrations/).

A real Trainer (TrainingArguments defaults except the run length, learning rate, batch size and
report_to/use_cpu; remove_unused_columns stays on) on a tiny Llama and an offline tokenizer; PEFT
with the same adapter weights and data is the oracle, step by step. Eager lowering throughout.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import adapt_compiler as ac
from hf_data import AccessLog, lora_pair, lm_dataset, tiny_lm, tokenizer
from oracle import assert_close, randomize_

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "v_proj"]
SPEC = ac.LoRA(r=4, alpha=8, targets=TARGETS)


def _pair():
    return lora_pair(TARGETS)


def _args(out: Path, **kw):
    base = dict(output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
                max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no")
    return transformers.TrainingArguments(**{**base, **kw})


def _trainer(model, args, n=8, eval_n=0):
    return transformers.Trainer(model=model, args=args, train_dataset=lm_dataset(n),
                                eval_dataset=lm_dataset(eval_n, seed=1) if eval_n else None,
                                processing_class=tokenizer())


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_same(ours, theirs, what):
    assert len(ours) == len(theirs) > 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}, step {i + 1}: {a} vs PEFT {b}"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One default run of each, evaluated, with our module's attribute reads recorded."""
    tmp = tmp_path_factory.mktemp("default")
    base, pm, m = _pair()
    with AccessLog(m) as log:
        ours = _trainer(m, _args(tmp / "ours", eval_strategy="steps", eval_steps=3), eval_n=4)
        ours.train()
    theirs = _trainer(pm, _args(tmp / "peft", eval_strategy="steps", eval_steps=3), eval_n=4)
    theirs.train()
    return ours, theirs, log, m


def test_default_trainer_trains_like_peft(default_run):
    ours, theirs, _, m = default_run
    losses = _losses(ours)
    _assert_same(losses, _losses(theirs), "training loss")
    assert losses[-1] < losses[0], f"the loss goes down: {losses}"
    ev = [h["eval_loss"] for h in ours.state.log_history if "eval_loss" in h]
    _assert_same(ev, [h["eval_loss"] for h in theirs.state.log_history if "eval_loss" in h], "eval loss")
    # what Trainer derived from the module: the dataset's columns kept, labels found, loss kwargs passed
    assert ours.label_names == ["labels"] and ours.model_accepts_loss_kwargs and ours._loss_shifts_labels
    assert ours.state.total_flos == theirs.state.total_flos > 0  # num_parameters(exclude_embeddings=True)
    assert not m.table.model.config.use_cache  # Trainer turned the cache off through m.config


def test_trainer_reads_the_peft_surface(default_run):
    """Every attribute Trainer read is ours (never a PeftModel stub), and the ones its features rely
    on were read: the PeftModel route (get_base_model), the loss setup (loss_type, accepts_loss_kwargs
    on the model view), FLOPs (num_parameters), the config (use_cache, special tokens)."""
    _, _, log, m = default_run
    module, view = log.seen["module"], log.seen["view"]
    assert {"get_base_model", "config", "generation_config", "num_parameters", "main_input_name"} <= module
    assert {"forward", "loss_type", "accepts_loss_kwargs", "config"} <= view
    _assert_not_blocked(m, module)


def _assert_not_blocked(m, names):
    import inspect

    for name in names:
        member = next((vars(c)[name] for c in type(m).__mro__ if name in vars(c)), None)
        doc = getattr(member, "__doc__", "") or ""
        assert "is not available on an AdaptedModule" not in doc, f"a client used the blocked {name}"


@pytest.mark.parametrize("option", [dict(gradient_accumulation_steps=2, per_device_train_batch_size=4),
                                    dict(label_smoothing_factor=0.1)], ids=["grad_accum", "label_smoothing"])
def test_loss_options_match_peft(tmp_path, option):
    """Gradient accumulation (num_items_in_batch over padded micro-batches of different sizes) and
    label smoothing (the label shift is chosen by m.base_model.model._get_name())."""
    base, pm, m = _pair()
    with AccessLog(m) as log:
        ours = _trainer(m, _args(tmp_path / "ours", **option))
        ours.train()
    theirs = _trainer(pm, _args(tmp_path / "peft", **option))
    theirs.train()
    _assert_same(_losses(ours), _losses(theirs), str(option))
    if "label_smoothing_factor" in option:
        assert "base_model" in log.seen["module"] and "_get_name" in log.seen["view"]


def test_checkpoints_are_peft_dirs_and_resume_continues_the_run(tmp_path):
    base, _, m = _pair()
    straight = _trainer(m, _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2))
    with AccessLog(m) as log_save:
        straight.train()
        straight.save_model()
    batch = {k: torch.tensor(v) for k, v in lm_dataset(2, seed=5)[:].items()}
    m.eval()
    with torch.no_grad():
        want = m(**batch).logits
    for d in (tmp_path / "run", tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file(), d
        assert not (d / "model.safetensors").exists()
    for loaded in (peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "run"),
                   ac.compile(copy.deepcopy(base), str(tmp_path / "run"), lowering="eager")):
        with torch.no_grad():
            assert_close(loaded.eval()(**batch).logits, want, what=f"{type(loaded).__name__} from save_model()")
    # resume from checkpoint-2 into a module whose adapters start elsewhere
    other = ac.compile(tiny_lm(), SPEC, lowering="eager")
    randomize_(other, ("lora_",), seed=7)
    resumed = _trainer(other, _args(tmp_path / "resumed", max_steps=4))
    with AccessLog(other) as log_resume:
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # the log history holds the checkpoint's two steps, then the two the resumed run computed
    _assert_same(_losses(resumed), _losses(straight), "loss after resume")
    for a, b in zip(other.adapter_parameters(), m.adapter_parameters()):
        assert torch.equal(a, b)
    assert "save_pretrained" in log_save.seen["module"]
    assert {"load_adapter", "active_adapters"} <= log_resume.seen["module"]


def test_without_peft_trainer_saves_the_state_dict_and_resumes(tmp_path, monkeypatch):
    """peft not importable (simulated for our class): no PeftModel base, so Trainer writes
    model.safetensors (the frozen base included), not a PEFT directory, and resumes from it."""
    from adapt_compiler.integrations import adapted_class

    monkeypatch.setattr(adapted_class, "peft_model_class", lambda: None)
    m = ac.compile(tiny_lm(), SPEC, lowering="eager")
    randomize_(m, ("lora_",))
    assert not isinstance(m, peft.PeftModel)
    straight = _trainer(m, _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2))
    straight.train()
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    other = ac.compile(tiny_lm(), SPEC, lowering="eager")
    resumed = _trainer(other, _args(tmp_path / "resumed", max_steps=4))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    _assert_same(_losses(resumed), _losses(straight), "loss after resume (state dict)")


REFUSED = {
    "label_names": dict(label_names=["target"]),
    "deepspeed": dict(deepspeed={"train_batch_size": 8}),
    "neftune_noise_alpha": dict(neftune_noise_alpha=5.0),
    "torch_compile": dict(torch_compile=True),
    "use_liger_kernel": dict(use_liger_kernel=True),
}  # fsdp is refused too (integrations/trainer.py), but Trainer itself refuses it first outside a distributed run


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_options_we_cannot_honour_are_refused_by_name(tmp_path, option):
    base = tiny_lm()
    m = ac.compile(base, SPEC, lowering="eager")
    args = _args(tmp_path)
    for k, v in REFUSED[option].items():  # set after construction: some need packages that are not installed
        object.__setattr__(args, k, v)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ac.AdapterError, match=option):
        _trainer(m, args).train()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in base.modules()), "your model got hooks"


def test_refused_before_training_starts(tmp_path):
    """The check runs in Trainer.__init__ (when it unwraps the PEFT model), not at step 1."""
    m = ac.compile(tiny_lm(), SPEC, lowering="eager")
    with pytest.raises(ac.AdapterError, match="label_names"):
        _trainer(m, _args(tmp_path, label_names=["target"]))
    assert not os.listdir(tmp_path) or not any(p.startswith("checkpoint") for p in os.listdir(tmp_path))
