"""targets=None: a spec's default targets on a model, made explicit before its adapter is created.

PEFT's per-method table for the model type comes first (default_targets.py, data). A model type
that no table lists gets the layers computing each attention's queries and values, found in a graph
captured from example inputs (the user's, else small ones built from the config:
example_inputs.py), by passes/_attention.py. Either way the spec then names its targets, so a saved
adapter_config.json lists them, as PEFT's does.
"""

from __future__ import annotations

from torch import nn

from .capture import capture
from .default_targets import peft_default
from .errors import AdapterError, CaptureError
from .example_inputs import example_inputs
from .passes._attention import query_value_layers


def default_targets(method_name: str, model: nn.Module, example: tuple | None = None):
    """The targets a spec with targets=None adapts on `model` (a list of names, or PEFT's regex)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = peft_default(method_name, model_type)
    if found is not None:
        return found if isinstance(found, str) else list(found)
    return attention_targets(model, example, model_type)


def attention_targets(model: nn.Module, example: tuple | None = None, model_type: str | None = None) -> list[str]:
    """The query and value projections (or fused qkv) of every attention in a captured graph."""
    try:
        args, kwargs = example if example is not None else example_inputs(model)
        captured = capture(model, args, kwargs, training=False)  # the user's model, restored afterwards
    except (AdapterError, CaptureError) as err:
        raise AdapterError(
            f"targets=None: PEFT lists no default targets for model type {model_type!r}, and finding the attention "
            f"projections needs a captured graph, which failed ({err}). Pass targets=[...] or example_inputs=.") from err
    found = query_value_layers(captured.graph_module)
    if not found:
        raise AdapterError(
            f"targets=None: PEFT lists no default targets for model type {model_type!r}, and the captured graph has no "
            f"attention whose query/value projections are linear layers. Pass targets=[...] (module names or a regex).")
    return found
