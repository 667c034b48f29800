"""The exceptions users see. A leaf module: every layer of the package may raise these."""

from __future__ import annotations


class AdapterError(ValueError):
    """Bad adapter input, raised at compile time, before anything the user owns is changed."""


class AdapterShapeError(AdapterError):
    """A target layer has a shape the method cannot take."""


class CheckpointError(AdapterError):
    """A checkpoint that cannot be read or does not fit the model."""


class CaptureError(AdapterError):
    """The base model could not be exported."""


class ExportError(AdapterError):
    """An export, package or ONNX conversion that cannot be done as asked."""


class AdapterAttributeError(AdapterError, AttributeError):
    """An attribute an AdaptedModule refuses on purpose (a PeftModel member that would run the wrong
    model, or a submodule of the user's model that would run without adapters). Being an
    AttributeError, `hasattr()` and `getattr(m, name, default)` treat it as missing."""
