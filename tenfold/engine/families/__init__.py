"""Per-family slot tables and layer applies of the native path (one file per family)."""

from .base import Bucket, LayerCall, adapt_layer_input, add_layer_updates, adapted_forward, add_output_updates
from .bat import BatBucket
from .bottleneck import BottleneckBucket
from .lorta import LoRTABucket
from .lowrank import LowRankBucket
from .miss import MissBucket

BUCKETS: dict[str, type[Bucket]] = {
    "lora": LowRankBucket, "loretta_rep": LowRankBucket, "lorta": LoRTABucket, "miss": MissBucket,
    "bat": BatBucket, "loretta_adp": BottleneckBucket,
}

__all__ = ["BUCKETS", "Bucket", "LayerCall", "adapt_layer_input", "add_layer_updates", "adapted_forward",
           "add_output_updates"]
