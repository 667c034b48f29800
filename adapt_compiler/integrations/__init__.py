"""Ecosystem glue, one file per concern: what transformers, TRL, accelerate, diffusers and generation
read from a model, provided by AdaptedModule without touching the user's model (docs/HF_INTEGRATION.md).

    hf_model.py       config, device, dtype, embeddings, counting, tags; attributes that read through
    adapted_class.py  the per-model class: PeftModel base, the model's forward signature, pickling
    peft_surface.py   PeftModel's spellings as aliases of ours; every other PeftModel member refused
    model_view.py     get_base_model(): the adapted model as an HF model (TRL's fused LM head)
    checkpointing.py  gradient/activation checkpointing, spelled as transformers and PEFT spell it
    trainer.py        Trainer options an AdaptedModule cannot honour, refused by name
"""
