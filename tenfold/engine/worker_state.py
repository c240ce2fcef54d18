"""What tenfold keeps beside one vLLM worker's LoRA manager, in one explicit object.

The patched methods of vLLM's worker LoRA manager (`patches/worker_loading.py`, `patches/worker_residency.py`)
read and write this object, created with the manager, instead of attributes scattered over vLLM's objects. The
model manager's side of a step (which adapters the step being prepared needs, so the slot store never evicts them)
is `NativeState.step_adapters`, set from here for the duration of each step's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import ModelSpec
from .residency import ResidencyLedger


@dataclass
class WorkerState:
    spec: ModelSpec  # the served model's shapes, which every adapter is validated against
    tensor_parallel_size: int
    ledger: ResidencyLedger = field(default_factory=ResidencyLedger)  # names, tiers, pins of this worker's adapters
    in_step: bool = False  # inside one step's activations: the ledger observes once, after all of them
