"""vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`, convert mode) as tenfold serves them: vLLM 0.32's gather slot index
-1 ("no adapter") as the last slot, which applies an adapter to base-model rows batched with adapter rows; here
those rows read no slot and get exact zeros. `engine/patches/cpu_lora_ops.py` (patch 3 of `engine/vllm_compat.py`)
puts them in vLLM's place."""

from __future__ import annotations

import torch


def _gathered(weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """Per-row adapter weights, zeros for rows without an adapter (index -1): those rows read no slot at all (a slot
    gathered for them and multiplied by a zero mask would still carry its NaN or Inf: 0 * NaN is NaN)."""
    has_adapter = (indices >= 0).nonzero().squeeze(1)
    rows = weights.index_select(0, indices.index_select(0, has_adapter))
    selected = weights.new_zeros((indices.numel(), *weights.shape[1:]), dtype=dtype)
    selected.index_copy_(0, has_adapter, rows.to(dtype))
    return selected.squeeze(dim=1) if selected.dim() == 4 else selected


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    selected = _gathered(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    selected = _gathered(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    selected = _gathered(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs
