"""transformers.Trainer options an AdaptedModule cannot honour, refused by name before training.

Trainer hands the model to the rest of the stack without asking it about its arguments, and some
options act on the model behind its back: NEFTune hooks the input embedding of the user's model
(which the captured graph never calls), Liger patches the user's modules, DeepSpeed and FSDP wrap
and shard what they are given, `torch_compile=True` compiles a module that is compiled already. So
the check finds the Trainer that drives the call (the first caller frame that is a method of a
`transformers.Trainer`, TRL's trainers included) and reads its arguments. It runs when Trainer
inspects the model in its `__init__` (it calls `get_base_model()` on a PEFT model) and on every
training-mode forward (the only call a Trainer makes on a model without PEFT); each Trainer is
checked once.
"""

from __future__ import annotations

import inspect
import sys
import weakref

from ..errors import AdapterError

_CHECKED: weakref.WeakSet = weakref.WeakSet()
_MAX_DEPTH = 48


def driving_trainer():
    """The transformers.Trainer whose method is on the call stack, or None."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return None
    here = module.__file__
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_filename == here:
            owner = frame.f_locals.get("self")
            if isinstance(owner, trainer_cls):
                return owner
        frame = frame.f_back
    return None


def check_driving_trainer(adapted) -> None:
    trainer = driving_trainer()
    if trainer is None or trainer in _CHECKED:
        return
    check_trainer_args(trainer.args, adapted)
    check_trainer_class(trainer, adapted)
    _CHECKED.add(trainer)


def check_trainer_class(trainer, adapted) -> None:
    """PEFT's MontecloraTrainerMixin adds the variational loss of the PEFT LoraModels it finds in the model;
    an AdaptedModule has none, so the mixin would add 0 without a word: refused, with the one-line fix."""
    mixin = getattr(sys.modules.get("peft.helpers"), "MontecloraTrainerMixin", None)
    if mixin is None or not isinstance(trainer, mixin):
        return
    if any(getattr(adapted.state.specs[n], "monteclora_config", None) for n in adapted.state.active):
        raise AdapterError(
            f"{type(trainer).__name__} uses PEFT's MontecloraTrainerMixin, which looks for PEFT's LoraModel inside "
            f"the model; an AdaptedModule has none, so the MonteCLoRA variational loss would silently be 0. Drop the "
            f"mixin and override compute_loss to add model.regularization_loss() (PEFT's _get_monteclora_loss) to "
            f"the task loss.")


def check_trainer_args(args, adapted) -> None:
    """Raise an AdapterError naming the first TrainingArguments option that cannot be honoured."""
    model = type(adapted.table.model).__name__
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        raise AdapterError(
            "TrainingArguments(deepspeed=...): DeepSpeed is not supported for an AdaptedModule (it shards and wraps the "
            "module, whose frozen base is shared with your model). Train with DDP (torchrun), which is supported."
        )
    if getattr(args, "fsdp", None):
        raise AdapterError(
            f"TrainingArguments(fsdp={args.fsdp!r}): FSDP through Trainer is not supported for an AdaptedModule yet. "
            f"Train with DDP (torchrun), or apply torch.distributed.fsdp.fully_shard in your own loop."
        )
    if getattr(args, "torch_compile", False):
        raise AdapterError(
            "TrainingArguments(torch_compile=True): the AdaptedModule is compiled already (ac.compile(..., "
            "lowering='inductor'), the default); drop torch_compile=True."
        )
    if getattr(args, "neftune_noise_alpha", None) is not None:
        raise AdapterError(
            f"TrainingArguments(neftune_noise_alpha={args.neftune_noise_alpha}): NEFTune hooks the input embedding of "
            f"your {model}, which the captured graph does not call, so the noise would never be added. Remove it."
        )
    if getattr(args, "use_liger_kernel", False):
        raise AdapterError(
            f"TrainingArguments(use_liger_kernel=True): Liger patches the modules of your {model}, which an "
            f"AdaptedModule never modifies (and its captured graph would not see). Remove it."
        )
    label_names = getattr(args, "label_names", None)
    if label_names:
        takes = inspect.signature(type(adapted.table.model).forward).parameters
        missing = [n for n in label_names if n not in takes]
        if missing:
            raise AdapterError(
                f"TrainingArguments(label_names={list(label_names)}): {model}.forward has no argument named "
                f"{missing}; its label argument is {[p for p in takes if 'label' in p] or 'missing'}. Name the "
                f"dataset column after the model's argument, or drop label_names."
            )
