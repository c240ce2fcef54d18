"""Errors raised while reading, validating or applying adapters.

Every message names the file (when there is one), the key, what was expected and what was found, so a user can fix
the checkpoint without reading tenfold's source. All derive from AdapterError (a ValueError), which the engine and
the server catch to fail one load or one request while everything else keeps running.
"""


class AdapterError(ValueError):
    """Base class: the adapter cannot be used as given."""


class AdapterFormatError(AdapterError):
    """The directory is not a checkpoint tenfold can read (missing files, bad JSON, corrupt tensors, unknown type)."""


class AdapterMismatchError(AdapterError):
    """The checkpoint does not fit the base model (layers, widths, heads, module names, divisibility)."""


class AdapterKeyError(AdapterMismatchError):
    """Tensor keys that match no module of the base model, or only some of the modules the adapter targets."""


class AdapterValueError(AdapterError):
    """Tensor values that cannot be served: NaN or Inf, non-floating dtypes."""


class AdapterTooLargeError(AdapterError):
    """The checkpoint is larger than the configured size limit."""


class NoExactLoRAError(AdapterError):
    """The family has no exact LoRA form (Bat, LoRETTA adp); it is served by tenfold's native path."""


def where(path, key=None) -> str:
    """'file, key' prefix for messages."""
    text = str(path) if path is not None else "<in memory>"
    return f"{text}, key {key!r}" if key is not None else text
