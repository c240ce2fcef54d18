"""Prefix-cache keys that carry the adapter version (patch 4 of `vllm_compat`)."""

from __future__ import annotations

from . import Replacement


def replacements() -> list[Replacement]:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    from ...adapters.checkpoint import fingerprint

    original = kv_cache_utils._gen_lora_extra_hash_keys

    def _gen_lora_extra_hash_keys(request):
        keys = original(request)
        if request.lora_request:
            # fixed per request at its first block: a request keeps the adapter version it started with
            version = getattr(request, "_tenfold_adapter_version", None)
            if version is None:
                version = fingerprint(request.lora_request.lora_path)
                request._tenfold_adapter_version = version
            keys = [*keys, ("tenfold-adapter-version", version, "")]
        return keys

    return [Replacement(kv_cache_utils, "_gen_lora_extra_hash_keys", _gen_lora_extra_hash_keys)]
