"""Gradient (activation) checkpointing, spelled as transformers and PEFT spell it.

`m.gradient_checkpointing_enable()` (PEFT, transformers < 5), `m.activation_checkpointing_enable()`
(transformers 5: Trainer calls it for `TrainingArguments(gradient_checkpointing=True)`, TRL's
default) and the model's own flag set before `ac.compile` all mean one thing here: the training
graphs recompute their repeated blocks in the backward (lowering/recompute.py), with the adapters
inside each block. Your model is not touched (PEFT would set the flags on it). The recompute is
always torch's non-reentrant checkpoint: the reentrant variant cannot run under torch.compile and
needs inputs that require grad (hence HF's `enable_input_require_grads`), and both recompute the
same block, so `use_reentrant` is accepted either way.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..lowering.recompute import model_checkpoints

# torch.utils.checkpoint options a checkpointed block honours (use_reentrant: see the docstring)
CHECKPOINT_OPTIONS = frozenset({"use_reentrant", "preserve_rng_state", "determinism_check", "debug"})


def checkpoint_options(kwargs: dict | None, where: str) -> dict:
    """The options to pass to torch.utils.checkpoint; refuses unknown ones by name."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - CHECKPOINT_OPTIONS)
    if unknown:
        raise AdapterError(
            f"{where}: unsupported checkpoint option(s) {unknown}; supported: {sorted(CHECKPOINT_OPTIONS)} "
            f"(every_n_layers and offload are arguments of activation_checkpointing_enable)."
        )
    kwargs.pop("use_reentrant", None)
    return kwargs


class CheckpointingSurface:
    """Mixin for AdaptedModule: expects `self.table`. The settings are part of the training graphs'
    cache key (table.Recompute.key), so toggling them (TRL's DPO does, around its reference pass)
    reuses the graphs built for each setting."""

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute every `every_n_layers`-th repeated block (decoder layer) of the training
        graphs in the backward instead of keeping its activations."""
        where = "activation_checkpointing_enable"
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise AdapterError(f"{where}: every_n_layers={every_n_layers!r} must be a positive integer.")
        if offload:
            raise AdapterError(
                f"{where}: offload=True (activations in host memory) is not supported; the recompute keeps only the "
                f"blocks' inputs. For less memory still, pass ac.compile(..., memory_budget=<fraction>)."
            )
        options = checkpoint_options(activation_checkpointing_kwargs, where)
        rc = self.table.recompute
        rc.mode, rc.every_n_layers, rc.options = "on", every_n_layers, options  # part of the graph cache key

    def activation_checkpointing_disable(self) -> None:
        """No recompute, whatever the user's model's own flag says."""
        self.table.recompute.mode = "off"

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """PEFT's and transformers < 5's spelling of activation_checkpointing_enable."""
        self.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        rc = self.table.recompute
        return rc.mode == "on" or (rc.mode == "model" and model_checkpoints(self.table.model))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """No-op, by design: PEFT hooks the input embeddings so that reentrant checkpointing sees
        an input that requires grad. Our graph is differentiated from the adapter parameters and
        checkpoints non-reentrantly, so nothing needs it (and your model gets no hook)."""

    def disable_input_require_grads(self) -> None:
        """No-op (see enable_input_require_grads)."""
