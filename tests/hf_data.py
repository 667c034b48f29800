"""Offline text data for the Trainer / TRL tests: a word-level tokenizer built in memory and tiny datasets."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("CI", "1")  # TRL: no telemetry

WORDS = ("the a cat dog sat on mat ran to house big small red blue green and is was it he she "
         "we they saw fish bird tree sun moon day night").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(WORDS)


def tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def texts(n: int = 16, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 11))) for _ in range(n)]


def lm_dataset(n: int = 16, seq: int = 12, seed: int = 0):
    """input_ids / attention_mask / labels, right-padded to `seq` (labels -100 on padding), so
    batches hold different numbers of label tokens (num_items_in_batch matters)."""
    from datasets import Dataset

    enc = tokenizer()(texts(n, seed), padding="max_length", max_length=seq, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, am)] for ids, am in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})


def text_dataset(n: int = 16, seed: int = 3):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts(n, seed)})


def tiny_lm(seed: int = 0, layers: int = 2):
    """A tiny LlamaForCausalLM sized to the tokenizer, in eval mode like a freshly loaded model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


CLIENTS = ("/transformers/", "/trl/", "/accelerate/", "/peft/")


class AccessLog:
    """Which attributes transformers / TRL / accelerate / peft code reads from an AdaptedModule and
    from its get_base_model() view while a real client runs (the instances' classes are swapped for
    recording subclasses inside the `with` block)."""

    def __init__(self, m):
        self.m, self.view = m, m.get_base_model()
        self.seen: dict[str, set] = {"module": set(), "view": set()}

    def _recording(self, obj, tag):
        seen = self.seen[tag]
        cls = type(obj)

        def __getattribute__(self, name):
            import sys

            caller = sys._getframe(1).f_code.co_filename
            if any(c in caller for c in CLIENTS):
                seen.add(name)
            return cls.__getattribute__(self, name)

        return type(f"Recorded{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})

    def __enter__(self):
        self.classes = type(self.m), type(self.view)
        self.m.__class__ = self._recording(self.m, "module")
        self.view.__class__ = self._recording(self.view, "view")
        return self

    def __exit__(self, *exc):
        self.m.__class__, self.view.__class__ = self.classes
        return False


def lora_pair(targets=("q_proj", "v_proj")):
    """(base, PEFT twin with non-trivial LoRA weights, our module with the same weights) over tiny_lm()."""
    import peft

    import adapt_compiler as ac
    from oracle import ours_from_peft, peft_twin, randomize_

    base = tiny_lm()
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    randomize_(pm, ("lora_",))
    return base, pm, ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=list(targets)))

