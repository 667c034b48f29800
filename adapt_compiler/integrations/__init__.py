"""Ecosystem glue, one file per client: what transformers, TRL, accelerate, diffusers and generation
read from a model, provided by AdaptedModule without touching the user's model."""
