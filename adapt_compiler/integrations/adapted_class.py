"""One class per wrapped model class: what isinstance checks, signature readers and pickle see.

`ac.compile(model, ...)` returns an instance of `Adapted<ModelClass>`, made once per model class:

    class AdaptedLlamaForCausalLM(AdaptedModule, peft.PeftModel)   # when peft is importable
    class AdaptedLlamaForCausalLM(AdaptedModule)                   # without peft

Why a class per model class:

* **The forward's signature is the model's** (plus keyword-only `adapter_names`), as a class-level
  `forward.__signature__`. transformers.Trainer drops dataset columns the forward does not name
  (`remove_unused_columns`), finds the label argument (`find_labels(type(model))`), and
  `generate` validates its keyword arguments, all by reading that signature.
* **PeftModel as a base.** Trainer writes a PEFT adapter directory, and resumes adapters, only
  when `isinstance(model, PeftModel)`; accelerate and TRL decide the same way. `PeftModel.__init__`
  never runs (AdaptedModule calls `nn.Module.__init__` itself); every PeftModel member that
  AdaptedModule does not define itself is replaced by a stub that refuses with the spelling to use
  instead (`peft_surface.blocked_members`), so an inherited PEFT method can never run against a
  model it does not know (`PeftModel.generate` would run the un-adapted model). PEFT is not a
  runtime dependency: without it the class has no PeftModel base, Trainer saves `model.safetensors`
  (the frozen base included) instead of a PEFT directory, and resumes from it.
* **Pickling.** The class is made at run time, so pickle cannot find it by name;
  `AdaptedModule.__reduce_ex__` names the factory in module.py (`rebuild`) with the model class,
  and the class is made again (or found in the cache) when the pickle is loaded.
"""

from __future__ import annotations

from torch import nn

from .hf_model import forward_signature

_CLASSES: dict = {}  # (base, model class, with_peft) -> the class


def peft_model_class():
    """peft.PeftModel, or None when PEFT is not installed (or importing it fails)."""
    try:
        from peft import PeftModel
    except Exception:  # noqa: BLE001 - any import failure means "no PEFT": the class works without it
        return None
    return PeftModel


def adapted_class(base: type, model_cls: type, with_peft: bool | None = None) -> type:
    """The `Adapted<ModelClass>` subclass of `base` (AdaptedModule) for models of `model_cls`.
    `with_peft`: None = when peft is importable."""
    peft_cls = peft_model_class() if with_peft in (None, True) else None
    key = (base, model_cls, peft_cls is not None)
    if key not in _CLASSES:
        _CLASSES[key] = _make(base, model_cls, peft_cls)
    return _CLASSES[key]


def _make(base: type, model_cls: type, peft_cls) -> type:
    def forward(self, *args, adapter_names=None, **kwargs):
        return base.forward(self, *args, adapter_names=adapter_names, **kwargs)

    forward.__signature__ = forward_signature(model_cls)
    forward.__doc__ = f"The adapted {model_cls.__name__}.forward (same inputs and outputs), plus adapter_names."
    name = f"Adapted{model_cls.__name__}"
    namespace = {"forward": forward, "__module__": __name__, "__qualname__": name,
                 "_adapted_model_class": model_cls, "_adapted_with_peft": peft_cls is not None}
    bases = (base,) if peft_cls is None else (base, peft_cls)
    if peft_cls is not None:
        from .peft_surface import blocked_members

        # stubs for every PeftModel member the AdaptedModule side does not define (see module docstring)
        own = {n for c in base.__mro__ if c is not nn.Module and c is not object for n in vars(c)}
        namespace.update(blocked_members(peft_cls, own))
    cls = type(name, bases, namespace)
    forward.__qualname__ = f"{name}.forward"
    return cls
