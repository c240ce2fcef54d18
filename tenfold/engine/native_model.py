"""The registered form of an adapter on the native path, in vLLM's LoRA model registry."""

from __future__ import annotations

from vllm.lora.lora_model import LoRAModel


class NativeLoRAModel(LoRAModel):
    """The validated family object instead of LoRA tensors; `adapter` is None for vLLM's warm-up dummies, whose
    slots run the base model."""

    def __init__(self, lora_model_id: int, adapter):
        super().__init__(lora_model_id, adapter.rank if adapter is not None else 1, {})
        self.adapter = adapter

    def clone(self, lora_model_id: int) -> "NativeLoRAModel":
        return NativeLoRAModel(lora_model_id, self.adapter)
