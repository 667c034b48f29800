"""MonteCLoRA (LoraConfig.monteclora_config) against PEFT 0.21.2 on a tiny Llama: eval outputs, training
steps with PEFT's own noise draws (the same torch RNG calls in the same order, across a buffer refill),
gradients of the task loss and of PEFT's variational loss, the sampler state PEFT saves, both checkpoint
directions and merge."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import adapt_compiler as ac
from models import tiny_llama, token_batch
from oracle import assert_close, compare_grads, logits_of, ours_from_peft, peft_twin, randomize_, square_loss

TARGETS = ["q_proj", "v_proj", "down_proj"]
MC = dict(num_samples=3, buffer_size=2, sample_scaler=0.05, use_entropy=True, kl_loss_weight=1e-2)


def _samplers(pm):
    return [m.lora_monteclora_sampler["default"] for _, m in pm.named_modules() if hasattr(m, "lora_monteclora_sampler")]


def _pair(base):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, monteclora_config=peft.MontecloraConfig(**MC))
    pm = peft_twin(base, cfg)
    randomize_(pm, ("lora_",), scale=0.3)  # A, B, std_prior and expert_weights_prior: all non-trivial
    return pm, ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=TARGETS, monteclora_config=MC))


def test_monteclora_trains_like_peft_with_peft_draws(tmp_path):
    base, batch = tiny_llama(layers=1), token_batch()
    pm, m = _pair(base)
    pm.eval(), m.eval()
    assert_close(logits_of(m(**batch)), logits_of(pm(**batch)), what="eval output")
    pm.train(), m.train()
    # three steps over buffer_size=2: PEFT refills inside its third forward, we in the third before_call
    for step in range(3):
        torch.manual_seed(100 + step)
        if step == 0:  # PEFT drew its first buffer at construction; draw it again from this seed, as we will
            for s in _samplers(pm):
                s.sampler._refill_buffer()
        theirs = pm(**batch)
        torch.manual_seed(100 + step)
        ours = m(**batch)
        assert_close(logits_of(ours), logits_of(theirs), what=f"training output, step {step}")
        their_reg, our_reg = pm.base_model._get_monteclora_loss(), m.regularization_loss()
        assert_close(our_reg, their_reg, what=f"variational loss, step {step}")
        (square_loss(ours) + our_reg).backward()
        (square_loss(theirs) + their_reg).backward()
        compare_grads(m, pm)
        # the noise reaches the sampler's parameters: their gradients exist and are compared
        named = dict(m.named_parameters())
        assert any("std_prior" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items())
        for params in (m.adapter_parameters(), [p for p in pm.parameters() if p.requires_grad]):
            torch.optim.SGD(params, lr=0.1).step()
            for p in params:
                p.grad = None
    # the sampler state PEFT keeps (and saves): the last sample's variance and expert weights
    theirs_sd = peft.get_peft_model_state_dict(pm)
    ours_sd = m.adapter_state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for k in theirs_sd:
        assert_close(ours_sd[k], theirs_sd[k], what=k)
    assert any("gaussian_var_prior" in k for k in ours_sd)
    pm.eval(), m.eval()
    want = logits_of(pm(**batch))
    assert_close(logits_of(m(**batch)), want, what="eval output after the steps")
    assert float(m.regularization_loss()) == 0.0 == float(pm.base_model._get_monteclora_loss())

    # both checkpoint directions
    pm.save_pretrained(tmp_path / "peft")
    loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert loaded.state.specs["default"].monteclora_config == {**MC, "dirichlet_prior": 0.1}
    assert_close(logits_of(loaded(**batch)), want, what="PEFT dir -> ours")
    m.save_adapter(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert isinstance(back.peft_config["default"].monteclora_config, peft.MontecloraConfig)
    assert_close(logits_of(back(**batch)), want, what="ours -> PeftModel.from_pretrained")
    # merge: plain LoRA's B·A, as PEFT merges it
    m.merge()
    assert_close(logits_of(m(**batch)), want, what="merged")
    m.unmerge()
    merged = pm.merge_and_unload()  # (PEFT's trained sampler holds non-leaf buffers: no deepcopy)
    assert_close(logits_of(merged(**batch)), want, what="PEFT merge_and_unload")


def test_monteclora_noise_is_live_in_training_only():
    """Two training calls draw two samples (different outputs); eval calls are deterministic LoRA."""
    base, batch = tiny_llama(layers=1), token_batch()
    _, m = _pair(base)
    m.train()
    a, b = logits_of(m(**batch)), logits_of(m(**batch))
    assert (a - b).abs().max() > 0
    (a.square().mean() + b.square().mean() + m.regularization_loss()).backward()  # two forwards, one backward
    assert all(p.grad is not None for n, p in m.named_parameters() if "monteclora" in n)
    m.eval()
    with torch.no_grad():
        assert torch.equal(logits_of(m(**batch)), logits_of(m(**batch)))


def test_monteclora_draws_per_call_under_torch_compile_of_the_module():
    """torch.compile(m) in training: each call gets the next sample of the sampler, as eager calls do (the hook
    runs outside Dynamo's graph), so the outputs equal an eager twin's, call for call, from the same seed."""
    base, batch = tiny_llama(layers=1), token_batch()
    _, eager = _pair(base)
    _, m = _pair(base)
    eager.train(), m.train()
    for twin in (m, eager):  # the eager call that builds the graph torch.compile(m) inlines; the first buffer
        torch.manual_seed(1)
        twin(**batch)
    compiled = torch.compile(m, backend="eager")
    outs = []
    for step in range(3):  # buffer_size=2: the second call here refills, drawing from the global generator
        torch.manual_seed(10 + step)
        got = logits_of(compiled(**batch))
        torch.manual_seed(10 + step)
        want = logits_of(eager(**batch))
        assert_close(got, want, rtol=1e-6, what="torch.compile(m) vs eager, same draws")
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 0 and (outs[1] - outs[2]).abs().max() > 0


def test_monteclora_refusals():
    with pytest.raises(ac.AdapterError, match="monteclora_config has no field 'monteclora_n'"):
        ac.LoRA(r=4, monteclora_config={"monteclora_n": 8})
    with pytest.raises(ac.AdapterError, match="use_dora and monteclora_config cannot be combined"):
        ac.LoRA(r=4, use_dora=True, monteclora_config={})
    with pytest.raises(ac.AdapterError, match="monteclora_config works on Linear layers only"):
        ac.compile(tiny_llama(layers=1), ac.LoRA(r=4, targets=["embed_tokens"], monteclora_config={}), lowering="eager")


def _trainer_args(out):
    import transformers

    return transformers.TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True,
                                          seed=0, logging_steps=1, max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no")


def test_monteclora_through_trainer(tmp_path):
    """transformers.Trainer trains it, with the variational loss added in compute_loss; PEFT's
    MontecloraTrainerMixin (which finds only PEFT's LoraModel, so would add 0 here) is refused by name."""
    import transformers
    from hf_data import lm_dataset, tiny_lm, tokenizer
    from peft.helpers import MontecloraTrainerMixin

    m = ac.compile(tiny_lm(layers=1), ac.LoRA(r=4, targets=["q_proj", "v_proj"], monteclora_config=MC),
                   lowering="eager")
    added = []

    class WithVariationalLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, **kw):
            task = super().compute_loss(model, inputs, **kw)
            reg = model.regularization_loss()  # of this call's samples, as PEFT's mixin computes it
            added.append(float(reg))
            return task + reg

    before = {n: p.detach().clone() for n, p in m.named_parameters() if "std_prior" in n}
    trainer = WithVariationalLoss(model=m, args=_trainer_args(tmp_path / "a"), train_dataset=lm_dataset(8),
                                  processing_class=tokenizer())
    trainer.train()
    assert len(added) == 2 and all(r > 0 for r in added)
    after = dict(m.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)

    class MixinTrainer(MontecloraTrainerMixin, transformers.Trainer):
        pass

    with pytest.raises(ac.AdapterError, match="MontecloraTrainerMixin.*regularization_loss"):
        MixinTrainer(model=m, args=_trainer_args(tmp_path / "b"), train_dataset=lm_dataset(8),
                     processing_class=tokenizer()).train()


@pytest.mark.parametrize("merge", [False, True])
def test_monteclora_directory_through_the_torch_compile_backend(tmp_path, merge):
    """ac.backend(dir) serves inference, where MonteCLoRA is plain LoRA: the fused op or the merged weight
    (checked on Dynamo's graph, without Inductor)."""
    from test_backend import _dynamo_graph

    base, batch = tiny_llama(layers=1), token_batch()
    pm, _ = _pair(base)
    pm.eval().save_pretrained(tmp_path)
    gm, inputs, count = _dynamo_graph(base, batch, ac.backend(tmp_path, merge=merge).apply_spec)
    assert count == len(TARGETS)
    with torch.no_grad():
        assert_close(gm(*inputs)[0], pm(**batch).logits, what=f"ac.backend(dir, merge={merge})")
