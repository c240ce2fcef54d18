"""Adapter administration shared by the HTTP and gRPC front ends: list, load (name/path rules), unload, and the
name -> LoRARequest lookup generation needs. Errors carry an HTTP status; gRPC maps it to its own codes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from ..engine.resolver import InvalidAdapterName, adapter_path


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None
    protect_all: bool
    adapter_root: Path | None


class AdminError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def resolve_runtime_path(settings: ServeSettings, name: str, path: str | None) -> Path:
    """Runtime loads stay inside --adapter-root: by name, or by a path that resolves inside it."""
    try:
        if path is None or path == "":
            if settings.adapter_root is None:
                raise AdminError(HTTPStatus.BAD_REQUEST, "runtime loads by name need --adapter-root")
            return adapter_path(settings.adapter_root, name)
        adapter_path(Path("/"), name)  # the name rules apply to explicit paths too
    except InvalidAdapterName as e:
        raise AdminError(HTTPStatus.BAD_REQUEST, str(e)) from None
    if settings.adapter_root is None:
        raise AdminError(HTTPStatus.BAD_REQUEST, "runtime loads need --adapter-root (paths given at start-up with "
                                                 "--adapter are fixed)")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(settings.adapter_root.resolve()):
        raise AdminError(HTTPStatus.BAD_REQUEST, f"path {path!r} is outside the adapter root")
    return resolved


# the family of an adapter whose current version this process has not validated yet (its next request or load does)
PENDING = "pending"


class AdapterAdmin:
    def __init__(self, app_state, settings: ServeSettings, facts_of):
        self.state = app_state
        self.settings = settings
        self.facts_of = facts_of  # path -> the recorded AdapterFacts of its current version, or None; never loads

    @property
    def models(self):
        return self.state.openai_serving_models

    async def residency(self) -> dict:
        """The workers' residency ledger (rank 0's: every tensor-parallel rank holds the same adapters)."""
        return (await self.state.engine_client.collective_rpc("tenfold_residency"))[0]

    async def describe(self, lora, residency: dict | None = None) -> dict:
        """One adapter's card, path included (for admins)."""
        [facts] = await asyncio.to_thread(lambda: [self.facts_of(lora.lora_path)])
        return _card(lora, residency or await self.residency(), facts, with_paths=True)

    async def list(self, with_paths: bool) -> list[dict]:
        """Every registered adapter's card; `with_paths` only for admins (a path tells where the server keeps files).
        Facts are the recorded ones (a stat per adapter, off the event loop): a listing never reads an adapter."""
        loras = list(self.models.lora_requests.values())
        residency = await self.residency()
        facts = await asyncio.to_thread(lambda: [self.facts_of(lora.lora_path) for lora in loras])
        return [_card(lora, residency, f, with_paths) for lora, f in zip(loras, facts)]

    async def pin(self, name: str) -> dict:
        """Loads the adapter into the workers (by name from the adapter root if needed) and pins it in their cache:
        no eviction drops it (it never has to be read from disk again) until it is unpinned or unloaded."""
        from ..engine.residency import pin_capacity

        lora = await self.lora_request(name)
        if lora is None:
            raise AdminError(HTTPStatus.BAD_REQUEST, "the base model is always resident; only adapters are pinned")
        residency = await self.residency()
        pinned, slots, cache = residency["pinned"], residency["device_slots"], residency["host_capacity"]
        if name not in pinned and len(pinned) >= pin_capacity(slots, cache):
            raise AdminError(HTTPStatus.CONFLICT,
                             f"cannot pin {name!r}: {len(pinned)} adapters are pinned ({', '.join(pinned) or '-'}) and "
                             f"the workers' cache (--max-cpu-loras {cache}) must keep room for one step's adapters "
                             f"(--max-loras {slots}) beside the pins; unpin one or raise --max-cpu-loras")
        await self.state.engine_client.add_lora(lora)  # resident in the workers before the pin
        residency = (await self.state.engine_client.collective_rpc("tenfold_pin", args=(name, True)))[0]
        return await self.describe(lora, residency)

    async def unpin(self, name: str) -> None:
        residency = await self.residency()
        if name not in residency["pinned"]:
            raise AdminError(HTTPStatus.NOT_FOUND, f"adapter {name!r} is not pinned")
        await self.state.engine_client.collective_rpc("tenfold_pin", args=(name, False))

    async def load(self, name: str, path: str | None = None) -> dict:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        resolved = resolve_runtime_path(self.settings, name, path)
        already = AdminError(HTTPStatus.CONFLICT, f"adapter {name!r} is already loaded; unload it first")
        if name in self.models.lora_requests:
            raise already
        result = await self.models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=str(resolved)))
        if not isinstance(result, str):
            if name in self.models.lora_requests:  # a request resolved the name meanwhile (vLLM answers 400)
                raise already
            raise AdminError(HTTPStatus(result.error.code), result.error.message)
        return await self.describe(self.models.lora_requests[name])

    async def unload(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        if name not in self.models.lora_requests:
            raise AdminError(HTTPStatus.NOT_FOUND, f"adapter {name!r} is not loaded")
        result = await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if not isinstance(result, str):
            raise AdminError(HTTPStatus(result.error.code), result.error.message)

    async def lora_request(self, name: str):
        """None for the base model; loads by name from the adapter root on first use (like the HTTP API)."""
        if not name or self.models.is_base_model(name):
            return None
        if name in self.models.lora_requests:
            return self.models.lora_requests[name]
        result = await self.models.resolve_lora(name)
        if not hasattr(result, "lora_int_id"):
            raise AdminError(HTTPStatus(result.error.code), result.error.message)
        return result


def _card(lora, residency: dict, facts, with_paths: bool) -> dict:
    held = residency["adapters"].get(lora.lora_name, {})
    card = {"name": lora.lora_name, "residency": "worker" if held.get("tiers") else "registered",
            "tiers": held.get("tiers", []), "pinned": lora.lora_name in residency["pinned"]}
    if with_paths:
        card["path"] = lora.lora_path
    if facts is None:
        card["family"] = PENDING
    else:
        card.update(family=facts.family, rank=facts.rank, params=facts.params, bytes=facts.nbytes)
    return card
