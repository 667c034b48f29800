"""The method registry: name -> method object. Each method file registers itself on import.

`register` validates what the rest of the package relies on, so a broken method file fails at
import with its name, not later inside a pass: the name, the spec type (an AdapterSpec dataclass
whose `method` field names the method), PEFT's type and parameter prefix, and the hooks of its kind.
"""

from __future__ import annotations

import dataclasses

from ..errors import AdapterError
from ..spec import AdapterSpec

METHODS: dict = {}  # name -> WeightMethod | GraphMethod
PEFT_TYPES: dict = {}  # PEFT's peft_type -> name

_REQUIRED = {
    "weight": ("check", "init_params", "forward", "merged_weight", "peft_key", "to_peft_config", "from_peft_config"),
    "graph": ("setup", "rewrite", "state_dict", "to_peft_config", "from_peft_config"),
}


def _validate(method) -> None:
    name = getattr(method, "name", None)
    where = f"adapter method {type(method).__name__}"
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"{where}: `name` must be an identifier (the registry key), got {name!r}.")
    kind = getattr(method, "kind", None)
    if kind not in _REQUIRED:
        raise AdapterError(f"{where}: `kind` must be one of {sorted(_REQUIRED)}, got {kind!r}.")
    spec_type = getattr(method, "spec_type", None)
    if not (isinstance(spec_type, type) and issubclass(spec_type, AdapterSpec) and dataclasses.is_dataclass(spec_type)):
        raise AdapterError(f"{where}: `spec_type` must be an AdapterSpec dataclass, got {spec_type!r}.")
    if spec_type.method != name:
        raise AdapterError(f"{where}: its spec {spec_type.__name__}.method is {spec_type.method!r}, not {name!r}.")
    peft_type = getattr(method, "peft_type", None)
    if not isinstance(peft_type, str) or not peft_type:
        raise AdapterError(f"{where}: `peft_type` must be PEFT's PeftType value (e.g. 'LORA').")
    prefix = getattr(method, "prefix", None)
    if not isinstance(prefix, str) or not prefix:
        raise AdapterError(f"{where}: `prefix` must be PEFT's parameter-name prefix (e.g. 'lora_').")
    missing = [h for h in _REQUIRED[kind] if not callable(getattr(method, h, None))]
    if missing:
        raise AdapterError(f"{where}: missing hooks {missing}.")
    if name in METHODS:
        raise AdapterError(f"adapter method {name!r} is registered twice.")
    if peft_type in PEFT_TYPES:
        raise AdapterError(f"{where}: peft_type {peft_type!r} is already served by {PEFT_TYPES[peft_type]!r}.")


def register(method, aliases: tuple[str, ...] = ()) -> None:
    """Add a method after validating it. `aliases`: extra PEFT types it loads (Bone -> MiSS)."""
    _validate(method)
    METHODS[method.name] = method
    for peft_type in (method.peft_type, *aliases):
        PEFT_TYPES[peft_type] = method.name


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods and remove them again)."""
    METHODS.pop(name)
    for peft_type in [t for t, n in PEFT_TYPES.items() if n == name]:
        del PEFT_TYPES[peft_type]


def method_for(spec):
    name = getattr(spec, "method", None)
    if name not in METHODS:
        raise AdapterError(
            f"{type(spec).__name__}: unknown adapter method {name!r}; known: {', '.join(sorted(METHODS))}."
        )
    return METHODS[name]


def method_for_peft_type(peft_type: str, where: str = "adapter_config.json"):
    if peft_type not in PEFT_TYPES:
        raise AdapterError(
            f"{where}: peft_type {peft_type!r} is not supported; supported: {', '.join(sorted(PEFT_TYPES))}."
        )
    return METHODS[PEFT_TYPES[peft_type]]
