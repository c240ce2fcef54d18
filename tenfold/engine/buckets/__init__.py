"""Per-family slot tables and layer applies of the native path (one file per family's bucket). Which bucket serves a
family is the family's own declaration (`adapters/<family>/__init__.py`)."""

from ...adapters.declaration import import_bucket
from ...adapters.registry import DECLARATIONS
from .base import Bucket, LayerCall, adapt_layer_input, add_layer_updates, adapted_forward, add_output_updates

BUCKETS: dict[str, type[Bucket]] = {name: import_bucket(d.bucket) for name, d in DECLARATIONS.items()}

__all__ = ["BUCKETS", "Bucket", "LayerCall", "adapt_layer_input", "add_layer_updates", "adapted_forward",
           "add_output_updates"]
