"""Fine-tune a BERT-style classifier with LoRA on query/value and a fully trained classifier head.

    python examples/bert_classifier_lora.py            # ~60 steps, well under a minute on a laptop CPU

The PEFT equivalent is `get_peft_model(model, LoraConfig(target_modules=["query", "value"],
modules_to_save=["classifier"]))`. Here `ac.compile` captures the model's graph and wires the
adapters in; the user's model is never modified, and only the adapters (and the classifier copy)
train. The task is synthetic so nothing is downloaded: a sequence's label is which half of the
vocabulary its tokens come from.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification

import adapt_compiler as ac

VOCAB = 100


def make_batch(batch: int, seq: int, generator: torch.Generator) -> dict:
    labels = torch.randint(0, 2, (batch,), generator=generator)
    low = torch.randint(1, VOCAB // 2, (batch, seq), generator=generator)
    ids = low + labels[:, None] * (VOCAB // 2 - 1)  # label 0: tokens in [1, 50); label 1: [50, 99)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@torch.no_grad()
def accuracy(model, batch: dict) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (logits.argmax(-1) == batch["labels"]).float().mean().item()


def main(steps: int = 60, quiet: bool = False, lowering: str = "inductor") -> dict:
    say = (lambda *a: None) if quiet else print
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=VOCAB, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()

    spec = ac.LoRA(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"])
    m = ac.compile(model, spec, lowering=lowering)
    m.train()
    opt = torch.optim.AdamW(m.adapter_parameters(), lr=5e-3)  # adapters exist as soon as compile() returns

    g = torch.Generator().manual_seed(0)
    held_out = make_batch(64, 12, g)
    m.eval()
    before = accuracy(m, held_out)
    m.train()
    from adapt_compiler.progress import progress

    for _ in progress(range(steps), desc="train", quiet=quiet):
        loss = m(**make_batch(16, 12, g)).loss  # same inputs and outputs as the HF model
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    after = accuracy(m, held_out)
    say(f"held-out accuracy: {before:.2f} -> {after:.2f} after {steps} steps")
    if not quiet:
        m.report().print()

    with tempfile.TemporaryDirectory() as tmp:
        m.save_adapter(tmp)  # PEFT format: peft.PeftModel.from_pretrained(model, tmp) loads it too
        reloaded = ac.compile(model, tmp, lowering="eager").eval()
        same = accuracy(reloaded, held_out) == after
    say(f"saved in PEFT format and reloaded: same predictions = {same}")
    return {"accuracy_before": before, "accuracy_after": after, "reloaded_same": same, "loss": loss.item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    main(steps=args.steps, quiet=args.quiet, lowering=args.lowering)
