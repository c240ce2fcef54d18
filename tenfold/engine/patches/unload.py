"""A real unload (patch 6 of `vllm_compat`): the endpoint also unpins the name and frees the adapter in the engine.
Every unload route (vLLM's /v1/unload_lora_adapter, tenfold's REST and gRPC admin) goes through it."""

from __future__ import annotations

from . import Replacement


def replacements() -> list[Replacement]:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request):
        # the entry this call deleted, read after the fact: the call waits on the name's lock, during which a
        # load or resolution may register the name under another id
        result = await original(self, request)
        removed = self.lora_requests.take_removed(request.lora_name)
        if removed is not None:
            # pins are by name in the workers: an unloaded name must not come back pinned when it loads again
            await self.engine_client.collective_rpc("tenfold_pin", args=(request.lora_name, False))
            await self.engine_client.remove_lora(removed.lora_int_id)  # frees the worker slot and host cache
        return result

    original_init = OpenAIServingModels.__init__

    def __init__(self, engine_client, *args, **kwargs):
        original_init(self, engine_client, *args, **kwargs)
        self.lora_requests = _NameRegistry(engine_client, self.lora_requests)

    return [Replacement(OpenAIServingModels, "unload_lora_adapter", unload_lora_adapter),
            Replacement(OpenAIServingModels, "__init__", __init__)]


class _NameRegistry(dict):
    """vLLM's name -> LoRARequest map. A name registered again under another id (a load or resolution that raced
    another one) leaves the engine the old id, which nothing would ever unload: retire it (the engine frees it once
    its requests in flight end). Deletions are recorded so that the unload endpoint frees the id it deleted."""

    def __init__(self, engine_client, initial):
        super().__init__(initial)
        self._engine_client = engine_client
        self._tasks = set()
        self._removed = {}  # name -> the entry its last unload deleted, until the unload endpoint frees it

    def __delitem__(self, name):
        self._removed[name] = self[name]
        super().__delitem__(name)

    def take_removed(self, name):
        return self._removed.pop(name, None)

    def __setitem__(self, name, lora_request):
        import asyncio

        previous = self.get(name)
        super().__setitem__(name, lora_request)
        if previous is not None and previous.lora_int_id != lora_request.lora_int_id:
            task = asyncio.get_running_loop().create_task(self._engine_client.remove_lora(previous.lora_int_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
