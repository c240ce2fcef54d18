"""Compilation (patch 9 of `vllm_compat`): native mode keeps vLLM's CPU compilation on; elsewhere it needs eager
mode."""

from __future__ import annotations

import logging

from . import Replacement

logger = logging.getLogger("tenfold")


class NativeModeNeedsEagerError(ValueError):
    pass


def native_compilation(vllm_config, requested, on_cpu: bool, device_name: str) -> None:
    """Native mode's compilation settings, after the platform's own: compiled on CPU as vLLM compiles the model
    without LoRA; elsewhere refused unless eager (graph capture would record one step's host-built plan and replay
    it for every later batch)."""
    from vllm.config import CompilationMode

    compilation = vllm_config.compilation_config
    if on_cpu:
        if requested == CompilationMode.VLLM_COMPILE and compilation.mode == CompilationMode.NONE:
            compilation.mode = CompilationMode.DYNAMO_TRACE_ONCE  # the inductor settings were applied before
            logger.info("tenfold: native mode keeps vLLM's CPU compilation on with LoRA enabled")
    elif not vllm_config.model_config.enforce_eager:
        raise NativeModeNeedsEagerError(
            f"tenfold's native mode does not run under {device_name} graph capture yet: serve with --enforce-eager "
            "(enforce_eager=True), or use TENFOLD_MODE=convert (vLLM's LoRA kernels)")


def replacements() -> list[Replacement]:
    from vllm.platforms import current_platform

    from ..mode import execution_mode

    platform = type(current_platform)
    original = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        requested = vllm_config.compilation_config.mode  # VLLM_COMPILE unless the user asked for eager execution
        original(cls, vllm_config)
        if execution_mode() == "native" and vllm_config.lora_config is not None:
            native_compilation(vllm_config, requested, current_platform.is_cpu(), current_platform.device_name)

    return [Replacement(platform, "check_and_update_config", classmethod(check_and_update_config))]
