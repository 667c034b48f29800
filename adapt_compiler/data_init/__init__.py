"""Data-driven LoRA initialisations: EVA's, CorDA's and LoRA-GA's passes over the user's data.

PEFT runs these with forward hooks on the user's modules (`initialize_lora_eva_weights`,
`preprocess_corda`) or a training step with gradients on its target weights (`preprocess_loraga`) and then
rewrites the model (new ranks, a residual base weight). Here the user's
model is never touched: the pass runs *our* captured graph, eager (the FX graph as is, in eval mode,
no compile), and reads each adapted layer's input where the graph hands it to the layer's AdapterSlot
(a forward hook on our slot module: `args[0]` is exactly the tensor the layer multiplies). While the pass
runs no adapter is active, so every slot computes its base layer and the slot inputs are the base model's
activations, as under PEFT's `disable_adapter()` (EVA) or before `get_peft_model` (CorDA).

What each pass leaves:
- EVA: the adapter re-created with the ranks EVA chose (rank_pattern / alpha_pattern with the layers'
  FQNs, like PEFT's; layers that got rank 0 leave `targets`), lora_A = the components, lora_B = 0.
  The base is unchanged. The saved config says init_lora_weights="eva", as PEFT's does.
- CorDA: lora_A / lora_B from the decomposition, in place (same tensors: an optimizer built before
  stays valid), and the layer's frozen weight in *our* copy replaced by the residual W − s·B₀A₀
  (`table.base_originals` keeps W; delete_adapter restores it). `m.report()` lists the replaced weights.
- LoRA-GA: the same as CorDA, from the SVD of each target weight's gradient over the user's training step
  (the pass runs our graph in train mode with grad, and our frozen copies of the target weights require grad
  for its duration).

Files: _pass.py (running the graph, reading the slots), eva.py, corda.py, loraga.py; the math is in
passes/_lora_init_eva.py, passes/_lora_init_corda.py and passes/_lora_init_loraga.py.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..passes._lora_init_corda import corda_config_of
from ._pass import existing
from .corda import preprocess_corda
from .eva import get_eva_state_dict, initialize_eva
from .loraga import preprocess_loraga


def run_pending(m, init_data=None) -> None:
    """The data passes `ac.compile` runs: every adapter waiting for one, with `init_data` (EVA: its
    dataloader; CorDA: its calibration batches; LoRA-GA: its training batches, whose losses are backpropagated),
    or, for CorDA, corda_config's cache_file if it exists."""
    if init_data is not None and not m.table.data_init:
        raise AdapterError("compile(): init_data= is the data pass of a data-driven LoRA init (init='eva', 'corda' or "
                           "'lora_ga'), and no adapter here has one; drop init_data or set the spec's init.")
    for name, pending in list(m.table.data_init.items()):
        spec = m.state.specs[name]
        if pending == "eva" and init_data is not None:
            initialize_eva(m, init_data, adapter_name=name)
        elif pending.startswith("corda") and (init_data is not None or existing(
                corda_config_of(spec.corda_config)["cache_file"]) is not None):
            preprocess_corda(m, data=init_data, adapter_name=name)
        elif pending.startswith("lora_ga") and init_data is not None:
            preprocess_loraga(m, data=init_data, adapter_name=name)



__all__ = ["get_eva_state_dict", "initialize_eva", "preprocess_corda", "preprocess_loraga", "run_pending"]
