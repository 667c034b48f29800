"""adapt_compiler: parameter-efficient fine-tuning adapters compiled into the model's graph."""

from . import export as _export_module  # noqa: F401 - loaded first so `ac.export` stays the function
from .api import backend, compile, export, export_onnx, package
from .data_init import get_eva_state_dict, initialize_eva, preprocess_corda, preprocess_loraga
from .errors import AdapterError, AdapterShapeError
from .export import adapter_constants
from .generation_export import GenerationPrograms
from .module import AdaptedModule
from .passes import METHODS
from .passes.lora import LoRA
from .spec import AdapterSpec

__all__ = [
    "METHODS",
    "AdaptedModule",
    "AdapterError",
    "AdapterShapeError",
    "AdapterSpec",
    "GenerationPrograms",
    "LoRA",
    "adapter_constants",
    "backend",
    "compile",
    "export",
    "export_onnx",
    "get_eva_state_dict",
    "initialize_eva",
    "initialize_lora_eva_weights",
    "package",
    "preprocess_corda",
    "preprocess_loraga",
]
initialize_lora_eva_weights = initialize_eva  # PEFT's name
__version__ = "0.1.0"


def __getattr__(name):
    # method specs from method files registered after import (each file exports its spec class)
    for method in METHODS.values():
        if method.spec_type.__name__ == name:
            return method.spec_type
    if name == "MiSS" and "bone" in METHODS:
        return METHODS["bone"].spec_type
    raise AttributeError(f"module 'adapt_compiler' has no attribute {name!r}")
