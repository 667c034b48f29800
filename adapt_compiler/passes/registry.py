"""The method registry: name -> method object. Each method file registers itself on import."""

from __future__ import annotations

from .method import AdapterError

METHODS: dict = {}  # name -> WeightMethod | GraphMethod
PEFT_TYPES: dict = {}  # PEFT's peft_type -> name


def register(method, aliases: tuple[str, ...] = ()) -> None:
    """Add a method; its spec type's `method` field must name it. Aliases map extra PEFT types."""
    if method.name in METHODS:
        raise AdapterError(f"adapter method {method.name!r} is registered twice")
    METHODS[method.name] = method
    for peft_type in (method.peft_type, *aliases):
        PEFT_TYPES[peft_type] = method.name


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
