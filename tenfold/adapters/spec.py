"""What tenfold needs to know about a base model: layer count, widths, heads and the linear modules per layer.

Built from a HuggingFace config (no weights needed), so adapters can be validated before any model is loaded.
Only decoder-only Llama-style architectures are described (q/k/v/o attention projections and a gated MLP with
gate/up/down): llama, mistral, qwen2, qwen3 and their relatives share these module names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import AdapterMismatchError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    model_type: str = "llama"
    dtype: torch.dtype = torch.float32
    name: str | None = None
    shapes: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        d, q, kv, ff = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        # (in_features, out_features) of each linear module, nn.Linear convention (weight is out x in).
        object.__setattr__(self, "shapes", {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d),
        })

    @classmethod
    def from_hf_config(cls, config) -> "ModelSpec":
        """From a transformers PretrainedConfig (or its dict)."""
        get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
        model_type = get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise AdapterMismatchError(
                f"base model type {model_type!r} is not supported: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = get("num_attention_heads")
        # "dtype" first: newer transformers renamed torch_dtype and warn when the old name is read
        dtype = get("dtype", None) or get("torch_dtype", None) or "float32"
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, torch.float32)
        return cls(
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", None) or heads,
            head_dim=get("head_dim", None) or get("hidden_size") // heads,
            intermediate_size=get("intermediate_size"),
            model_type=model_type,
            dtype=dtype,
            name=get("_name_or_path", None) or None,
        )

    @classmethod
    def from_pretrained(cls, path) -> "ModelSpec":
        from transformers import AutoConfig

        return cls.from_hf_config(AutoConfig.from_pretrained(path))

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def module_shape(self, module: str) -> tuple[int, int]:
        if module not in self.shapes:
            raise AdapterMismatchError(
                f"module {module!r} does not exist in the base model: expected one of {', '.join(LINEAR_MODULES)}")
        return self.shapes[module]

    def check_layer(self, layer: int, context: str) -> None:
        if not 0 <= layer < self.num_layers:
            raise AdapterMismatchError(
                f"{context}: layer {layer} does not exist: the base model has {self.num_layers} layers (0..{self.num_layers - 1})")


def served_spec(hf_config) -> ModelSpec:
    """The served model's shapes, from its HF config as vLLM holds it (vllm_config.model_config.hf_config, or a
    model's .config): the text decoder's config where the model has several."""
    return ModelSpec.from_hf_config(hf_config.get_text_config())
