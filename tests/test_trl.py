"""TRL 1.16's SFTTrainer and DPOTrainer train an AdaptedModule as they train a PeftModel.

Both patch `get_base_model()` with a fused LM head (log-probabilities without the full logits):
here that is the adapted model view (integrations/model_view.py), whose `.base_model` runs the
adapted backbone graph, so your model is never patched and the fused head's custom backward runs
eagerly on top of our graph. SFTConfig's default gradient checkpointing goes through
`activation_checkpointing_enable` to our recompute pass. PEFT with the same adapter weights, data
and settings is the oracle, step by step. Eager lowering; three steps each.
"""

from __future__ import annotations

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.lowering.recompute import recomputed_blocks
from hf_data import AccessLog, lora_pair, text_dataset, texts, tiny_lm, tokenizer

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
TARGETS = ["q_proj", "v_proj"]
SPEC = ac.LoRA(r=4, alpha=8, targets=TARGETS)


def _pair():
    return lora_pair(TARGETS)


def _common(out, **kw):
    return dict(output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
                max_steps=3, learning_rate=1e-2, bf16=False, save_strategy="no", **kw)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_same(ours, theirs, what, rtol=1e-5):
    assert len(ours) == len(theirs) > 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= rtol * max(1.0, abs(b)), f"{what}, step {i + 1}: {a} vs PEFT {b}"


def _sft(model, out):
    args = trl.SFTConfig(**_common(out, per_device_train_batch_size=4, max_length=16))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer())
    trainer.train()
    return trainer


def test_sft_trainer_trains_like_peft(tmp_path):
    base, pm, m = _pair()
    forward_before = base.forward
    with AccessLog(m) as log:
        ours = _sft(m, tmp_path / "ours")
    theirs = _sft(pm, tmp_path / "peft")
    _assert_same(_losses(ours), _losses(theirs), "SFT loss")
    logged = ours.state.log_history[0]
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(logged)
    # TRL's fused LM head went onto the view, never onto your model; it ran our backbone graph
    assert "forward" not in vars(base) and base.forward == forward_before
    assert "forward" in vars(m.get_base_model())
    assert any(root == "model" for root, _, _ in m._graphs), "the adapted backbone graph served the fused head"
    # SFTConfig's default gradient checkpointing reached our recompute pass (on the backbone graph)
    assert m.is_gradient_checkpointing and not base.model.layers[0].gradient_checkpointing
    backbone = next(e for (root, training, _), es in m._graphs.items() if root == "model" and training for e in es)
    assert recomputed_blocks(next(iter(backbone.graphs.values()))) == ["model.layers.0", "model.layers.1"]
    module, view = log.seen["module"], log.seen["view"]
    assert {"activation_checkpointing_enable", "enable_input_require_grads", "add_model_tags", "get_base_model",
            "get_output_embeddings", "config"} <= module
    assert {"forward", "base_model", "get_output_embeddings", "config"} <= view
    assert "trl" in " ".join(m.model_tags) and not base.model_tags


def test_sft_refuses_an_adapter_on_the_head_it_reads_directly(tmp_path):
    m = ac.compile(tiny_lm(), ac.LoRA(r=2, targets=["q_proj", "lm_head"]), lowering="eager")
    with pytest.raises(ac.AdapterError, match="lm_head"):
        _sft(m, tmp_path)


def test_dpo_trainer_trains_like_peft(tmp_path):
    """PEFT route of DPO: TRL copies adapter "default" into a frozen "ref" adapter through
    peft_config / add_adapter / named_parameters / get_parameter, and scores the reference with
    set_adapter("ref") around each step (toggling gradient checkpointing off and on)."""
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": texts(6, 7), "chosen": texts(6, 8), "rejected": texts(6, 9)})

    def run(model, out):
        args = trl.DPOConfig(**_common(out, per_device_train_batch_size=2, max_length=32))
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer())
        trainer.train()
        return trainer

    base, pm, m = _pair()
    initial = {n: p.detach().clone() for n, p in m.named_parameters() if ".default." in n}
    with AccessLog(m) as log:
        ours = run(m, tmp_path / "ours")
    theirs = run(pm, tmp_path / "peft")
    _assert_same(_losses(ours), _losses(theirs), "DPO loss", rtol=1e-4)
    assert list(m.state.specs) == ["default", "ref"] and m.active_adapters == ("default",)
    for n, p in m.named_parameters():
        if ".ref." in n:
            assert torch.equal(p, initial[n.replace(".ref.", ".default.")]) and not p.requires_grad
    assert not torch.equal(m.get_parameter(next(iter(initial))), next(iter(initial.values()))), "default trained"
    assert {"peft_config", "add_adapter", "get_parameter", "set_adapter", "active_adapter",
            "is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"} \
        <= log.seen["module"]
    assert "forward" not in vars(base)
