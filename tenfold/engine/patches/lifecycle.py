"""Adapter versions under traffic (patch 7 of `vllm_compat`): admission, unload and reload through
`versions.AdapterVersions`, and a name resolved again when an unload raced its lookup."""

from __future__ import annotations

import logging

from . import Replacement, replacing

logger = logging.getLogger("tenfold")


def replacements() -> list[Replacement]:
    """Every engine client (AsyncLLM, LLMEngine) admits adapter requests through `versions.AdapterVersions`: a
    request runs on an immutable snapshot of the version it was admitted with, under an engine id of that version;
    `remove_lora` retires a name's versions and frees each one when its last request ends (vLLM 0.32 removes it from
    the workers at once, and the next step of a request still using it kills the engine)."""
    import asyncio

    from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    from ...adapters import AdapterError
    from ..versions import ENGINE_ID_BASE, AdapterVersions

    def versions_of(engine, free) -> AdapterVersions:
        versions = getattr(engine, "_tenfold_versions", None)
        if versions is None:
            versions = AdapterVersions(engine.input_processor._tenfold_check_path, free)
            engine._tenfold_versions = versions
            engine.output_processor._tenfold_versions = versions
        return versions

    def refused(lora_request, e: Exception) -> VLLMValidationError:
        return VLLMValidationError(f"adapter {lora_request.lora_name!r} cannot be served: {_without_root(e)}",
                                   parameter="lora_request", value=lora_request.lora_name)

    # AsyncLLM: admission off the event loop; frees run as tasks on the loop that owns the engine client
    async def free_async(engine, freeable) -> None:
        for version in freeable:
            try:
                await original_async_remove(engine, version.engine_id)
            except Exception:  # a dead engine has nothing left to free; its own error reaches the requests
                logger.exception("tenfold: freeing adapter version %d failed", version.engine_id)
            engine._tenfold_versions.discard(version)

    def async_versions(engine) -> AdapterVersions:
        engine._tenfold_loop = asyncio.get_running_loop()
        tasks = engine.__dict__.setdefault("_tenfold_free_tasks", set())

        def free(freeable):
            def start():
                task = engine._tenfold_loop.create_task(free_async(engine, freeable))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            engine._tenfold_loop.call_soon_threadsafe(start)
        return versions_of(engine, free)

    async def async_add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, **kwargs):
        if lora_request is None or isinstance(prompt, EngineCoreRequest):
            return await original_async_add_request(self, request_id, prompt, params, arrival_time, lora_request,
                                                    **kwargs)
        versions = async_versions(self)
        try:
            bound = await asyncio.to_thread(versions.admit, lora_request)
        except (AdapterError, FileNotFoundError, RuntimeError) as e:
            raise refused(lora_request, e) from None
        try:
            return await original_async_add_request(self, request_id, prompt, params, arrival_time, bound, **kwargs)
        finally:
            versions.release(bound.lora_int_id)

    async def async_add_lora(self, lora_request):
        versions = async_versions(self)
        versions.forget_user(lora_request.lora_int_id)  # vLLM reuses a loaded name's id for in-place loads
        new_id = not versions.engine_ids_of(lora_request.lora_int_id)
        bound = await asyncio.to_thread(versions.admit, lora_request, False)
        try:
            return await original_async_add_lora(self, bound)
        except BaseException:
            if new_id:  # the front end registers no name for a failed load: nothing would ever unload this id
                await free_async(self, versions.retire_user(lora_request.lora_int_id)[1])
            raise

    async def async_remove_lora(self, lora_id: int) -> bool:
        if lora_id >= ENGINE_ID_BASE or getattr(self, "_tenfold_versions", None) is None:
            return await original_async_remove(self, lora_id)
        async_versions(self)
        had, freeable = self._tenfold_versions.retire_user(lora_id)
        await free_async(self, freeable)
        return had

    async def async_list_loras(self) -> set[int]:
        return _user_ids(self, await original_async_list(self))

    # LLMEngine (offline LLM API): the same, synchronously
    def sync_versions(engine) -> AdapterVersions:
        def free(freeable):
            for version in freeable:
                try:
                    original_sync_remove(engine, version.engine_id)
                except Exception:
                    logger.exception("tenfold: freeing adapter version %d failed", version.engine_id)
                engine._tenfold_versions.discard(version)
        return versions_of(engine, free)

    def sync_add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, **kwargs):
        if lora_request is None or isinstance(prompt, EngineCoreRequest):
            return original_sync_add_request(self, request_id, prompt, params, arrival_time, lora_request, **kwargs)
        versions = sync_versions(self)
        try:
            bound = versions.admit(lora_request)
        except (AdapterError, FileNotFoundError, RuntimeError) as e:
            raise refused(lora_request, e) from None
        try:
            return original_sync_add_request(self, request_id, prompt, params, arrival_time, bound, **kwargs)
        finally:
            versions.release(bound.lora_int_id)

    def sync_add_lora(self, lora_request):
        versions = sync_versions(self)
        versions.forget_user(lora_request.lora_int_id)
        new_id = not versions.engine_ids_of(lora_request.lora_int_id)
        bound = versions.admit(lora_request, False)
        try:
            return original_sync_add_lora(self, bound)
        except BaseException:
            if new_id:  # as in async_add_lora
                versions._on_freeable(versions.retire_user(lora_request.lora_int_id)[1])
            raise

    def sync_remove_lora(self, lora_id: int) -> bool:
        if lora_id >= ENGINE_ID_BASE or getattr(self, "_tenfold_versions", None) is None:
            return original_sync_remove(self, lora_id)
        had, freeable = sync_versions(self).retire_user(lora_id)
        self._tenfold_versions._on_freeable(freeable)
        return had

    def sync_list_loras(self) -> set[int]:
        return _user_ids(self, original_sync_list(self))

    # the output processor reports when each request's use of its version starts and ends
    def add_request(self, request, prompt, parent_req=None, request_index=0, queue=None):
        original_output_add(self, request, prompt, parent_req, request_index, queue)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None and request.lora_request is not None:
            versions.started(request.request_id, request.lora_request.lora_int_id)

    def _finish_request(self, req_state):
        original_finish(self, req_state)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None:
            versions.ended(req_state.request_id)

    def abort_requests(self, request_ids, internal):
        aborted = original_abort(self, request_ids, internal)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None:
            for request_id in aborted:
                versions.ended(request_id)
        return aborted

    original_async_add_request, original_async_add_lora = AsyncLLM.add_request, AsyncLLM.add_lora
    original_async_remove, original_async_list = AsyncLLM.remove_lora, AsyncLLM.list_loras
    original_sync_add_request, original_sync_add_lora = LLMEngine.add_request, LLMEngine.add_lora
    original_sync_remove, original_sync_list = LLMEngine.remove_lora, LLMEngine.list_loras
    original_output_add, original_finish = OutputProcessor.add_request, OutputProcessor._finish_request
    original_abort = OutputProcessor.abort_requests
    return [
        *replacing(AsyncLLM, add_request=async_add_request, add_lora=async_add_lora, remove_lora=async_remove_lora,
                   list_loras=async_list_loras),
        *replacing(LLMEngine, add_request=sync_add_request, add_lora=sync_add_lora, remove_lora=sync_remove_lora,
                   list_loras=sync_list_loras),
        *replacing(OutputProcessor, add_request=add_request, _finish_request=_finish_request,
                   abort_requests=abort_requests),
        *_resolution_race(VLLMNotFoundError),
        *_resolution_refusals(),
    ]


def _user_ids(engine, engine_ids) -> set[int]:
    """Resident adapters as the front end names them (a version's engine id -> the user id it serves)."""
    versions = getattr(engine, "_tenfold_versions", None)
    if versions is None:
        return set(engine_ids)
    return {user if (user := versions.user_of(i)) is not None else i for i in engine_ids}


def _without_root(error: Exception) -> str:
    """An error's message with the adapter root's path written as <adapter-root>: tenants see their adapter's place in
    the root, nothing of the server's layout."""
    from ..resolver import root_from_env

    root = root_from_env()
    return str(error).replace(str(root.resolve()), "<adapter-root>") if root is not None else str(error)


def _resolution_refusals() -> list[Replacement]:
    """vLLM answers a name its resolvers found but could not load with "was found but could not be loaded" and logs
    the reason: say why instead (the admission's refusal, remembered per version)."""
    from http import HTTPStatus

    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response

    from ..resolver import InvalidAdapterName, adapter_path, root_from_env

    original = OpenAIServingModels.resolve_lora

    async def resolve_lora(self, lora_name: str):
        result = await original(self, lora_name)
        versions = getattr(self.engine_client, "_tenfold_versions", None)
        root = root_from_env()
        if not (isinstance(result, ErrorResponse) and result.error.code == HTTPStatus.BAD_REQUEST.value
                and versions is not None and root is not None):
            return result
        try:
            refusal = versions.refusal_of(adapter_path(root, lora_name))
        except InvalidAdapterName:
            return result
        if refusal is None:
            return result
        return create_error_response(message=f"adapter {lora_name!r} cannot be served: {_without_root(refusal)}",
                                     err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)

    return [Replacement(OpenAIServingModels, "resolve_lora", resolve_lora)]


def _resolution_race(not_found) -> list[Replacement]:
    """vLLM checks a request's model name, then awaits, then looks the adapter up again: an unload in between
    answered 404 for a name the adapter root still resolves. Resolve it again from the root instead (registered
    under a new id, loaded on first use like any resolved name)."""
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.lora.request import LoRARequest

    from ..resolver import InvalidAdapterName, adapter_path, root_from_env

    original = BaseServing._maybe_get_adapters

    def _maybe_get_adapters(self, request, supports_default_mm_loras: bool = False):
        try:
            return original(self, request, supports_default_mm_loras)
        except not_found:
            root = root_from_env()
            if root is None or not request.model:
                raise
            try:
                path = adapter_path(root, request.model)
            except InvalidAdapterName:
                raise not_found(f"The model `{request.model}` does not exist.") from None
            if not path.is_dir():
                raise
            models = self.models
            lora = models.lora_requests.get(request.model)  # registered meanwhile by a concurrent resolution
            if lora is None:
                lora = LoRARequest(request.model, models.lora_id_counter.inc(1), str(path))
                models.lora_requests[request.model] = lora
            return lora

    return [
        Replacement(BaseServing, "_maybe_get_adapters", _maybe_get_adapters),
    ]
