"""`m.get_base_model()`: the user's model as the adapted module runs it, without touching the model.

PeftModel's `get_base_model()` returns the HF model with the adapter layers injected into it:
calling it runs the adapted model, and clients change it. TRL's SFT and DPO trainers replace its
`forward` with a fused LM head (`add_fused_lm_head(model.get_base_model())`) that calls
`self.base_model(...)` (the backbone) and reads `self.get_output_embeddings().weight`; PeftModel
then routes every call through that replaced forward. Handing out the user's own model would let
TRL patch it, and its fused forward cannot be captured for training anyway (its custom autograd
function is inlined by torch.export and loses its backward).

So `get_base_model()` returns an `AdaptedModelView` (one per AdaptedModule, made on first use):

* calling it (its class-level `forward`, with the model's signature) runs the adapted module;
* `.base_model` is the adapted *backbone* (`getattr(model, model.base_model_prefix)` with the
  adapters, captured as its own graph: `AdaptedModule._forward_at(root, ...)`), as
  `PreTrainedModel.base_model` is the backbone;
* `.get_output_embeddings()` is the output head the adapted module uses (the frozen weight at the
  module's dtype, or the active `modules_to_save` copy); an adapter *on* the head is refused, as TRL
  refuses it for PEFT models (the fused head reads `lm_head.weight` directly);
* other attributes read through to the user's model (hf_model.read_through);
* `_get_name()` and the class's forward signature are the model's, for Trainer's label detection
  and label smoothing.

A client that replaces the view's `forward` (TRL) is then honoured the way PeftModel honours it:
`AdaptedModule.forward` calls `routed_forward(m)` first. The view owns no parameters (they live on
the AdaptedModule) and is not pickled (`AdaptedModule.__getstate__` drops it: a replaced forward is
usually a closure).
"""

from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from ..names import slot_key
from .hf_model import forward_signature, read_through

_VIEW_CLASSES: dict = {}  # model class -> view class


class AdaptedModelView(nn.Module):
    """See the module docstring. `self._adapted` is the AdaptedModule."""

    def __init__(self, adapted):
        nn.Module.__init__(self)
        self.__dict__["_adapted"] = adapted  # not a child: no cycle in modules(), state_dict()

    def forward(self, *args, adapter_names=None, **kwargs):
        return self._adapted._forward_at("", args, kwargs, adapter_names)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("_") or "_adapted" not in self.__dict__:
                raise
        return read_through(self.__dict__["_adapted"].table.model, name, type(self).__name__)

    def _get_name(self) -> str:
        return type(self._adapted.table.model).__name__

    def train(self, mode: bool = True):
        self._adapted.train(mode)
        self.training = mode
        return self

    @property
    def config(self):
        return self._adapted.config

    @property
    def generation_config(self):
        return self._adapted.generation_config

    @property
    def device(self):
        return self._adapted.device

    @property
    def dtype(self):
        return self._adapted.dtype

    @property
    def main_input_name(self) -> str:
        return self._adapted.main_input_name

    def get_input_embeddings(self) -> nn.Module:
        return self._adapted.get_input_embeddings()

    @property
    def base_model(self):
        """The adapted backbone (PreTrainedModel.base_model: the `base_model_prefix` submodule)."""
        model = self._adapted.table.model
        prefix = getattr(model, "base_model_prefix", "") or ""
        if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
            return self
        return AdaptedBackbone(self._adapted, prefix)

    def get_output_embeddings(self) -> nn.Module | None:
        return output_head(self._adapted)


class AdaptedBackbone:
    """Calls the adapted module's graph of one submodule (`root`), with the adapters on it."""

    def __init__(self, adapted, root: str):
        self.adapted, self.root = adapted, root

    def __call__(self, *args, adapter_names=None, **kwargs):
        return self.adapted._forward_at(self.root, args, kwargs, adapter_names)

    def __repr__(self) -> str:
        return f"AdaptedBackbone({type(self.adapted.table.model).__name__}.{self.root})"


class _Head(nn.Module):
    """The output head's tensors as the adapted module runs them (`.weight`, `.bias`)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.__dict__["weight"], self.__dict__["bias"] = weight, bias  # the frozen tensors themselves


def output_head(adapted) -> nn.Module | None:
    """The head the adapted module multiplies by (see the module docstring)."""
    table = adapted.table
    get = getattr(table.model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    fqn = next((n for n, mod in table.model.named_modules() if mod is head), None)
    key = slot_key(fqn)
    slot = table.slots[key] if key in table.slots else None
    if slot is not None and any(n in slot.methods for n in table.active):
        raise AdapterError(
            f"{fqn}: an adapter on the output head cannot be used by a client that reads {fqn}.weight directly "
            f"(TRL's fused LM head); remove {fqn.split('.')[-1]!r} from the adapter's targets (or train it with "
            f"modules_to_save=[{fqn.split('.')[-1]!r}])."
        )
    saved = table.saved[key] if key in table.saved else None
    for name in table.active:
        if saved is not None and name in saved.copies:
            return saved.copies[name]
    return _Head(table.frozen.get(f"{fqn}.weight"), table.frozen.get(f"{fqn}.bias"))


def view_of(adapted) -> AdaptedModelView:
    """The AdaptedModule's view, made on first use and kept (a client may replace its forward)."""
    view = adapted.__dict__.get("_hf_view")
    if view is None:
        model_cls = type(adapted.table.model)
        if model_cls not in _VIEW_CLASSES:
            def forward(self, *args, adapter_names=None, **kwargs):
                return AdaptedModelView.forward(self, *args, adapter_names=adapter_names, **kwargs)

            forward.__signature__ = forward_signature(model_cls)
            name = f"Adapted{model_cls.__name__}View"
            _VIEW_CLASSES[model_cls] = type(name, (AdaptedModelView,), {"forward": forward, "__qualname__": name})
        view = adapted.__dict__["_hf_view"] = _VIEW_CLASSES[model_cls](adapted)
        view.training = adapted.training
    return view


def routed_forward(adapted):
    """The forward a client installed on the view (TRL's fused LM head), or None: PeftModel routes
    every call through `get_base_model().forward`, so a replaced forward serves `m(...)` too."""
    view = adapted.__dict__.get("_hf_view")
    if view is None:
        return None
    return view.__dict__.get("forward")


class PeftTunerView:
    """`m.base_model`, PeftModel's meaning: the tuner (LoraModel) whose `.model` is the adapted HF
    model. Trainer reads `m.base_model.model._get_name()` (label smoothing); calling it runs the
    model, as `LoraModel.forward` does."""

    def __init__(self, view: AdaptedModelView):
        self.model = view

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)
