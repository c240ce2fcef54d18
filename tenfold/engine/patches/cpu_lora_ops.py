"""vLLM's CPU LoRA ops for convert mode (patch 3 of `vllm_compat`): `kernels/lora_cpu_ops.py` in their place."""

from __future__ import annotations

from . import Replacement


def replacements() -> list[Replacement]:
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from ...kernels.lora_cpu_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    # sgmv_* call bgmv_* through the ops module's globals; punica_cpu and the package imported the names directly.
    return [Replacement(module, name, fn) for module in (ops, package, punica_cpu) for name, fn in fixed.items()
            if hasattr(module, name)]
