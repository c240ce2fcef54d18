"""vLLM general plugin entry point (group `vllm.general_plugins`): runs once in every vLLM process."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Patch vLLM (version-guarded) and register the adapter-root resolver; safe to call any number of times."""
    global _registered
    if _registered:
        return
    from . import parent_watch, vllm_compat

    parent_watch.install()  # an engine process stops when the process that started it is gone
    vllm_compat.install()
    _register_resolver()
    _tune_cpu_allocator()
    _registered = True


def _register_resolver() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from .resolver import AdapterRootResolver, root_from_env

    root = root_from_env()
    if root is not None and "tenfold" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("tenfold", AdapterRootResolver(root))


def _tune_cpu_allocator() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from .cpu_malloc import tune_malloc

        tune_malloc()
