"""The gRPC servicer: Generate / GenerateStream on the shared vLLM engine, adapter admin through AdapterAdmin, plus
the standard health service and server reflection."""

from __future__ import annotations

import uuid
from http import HTTPStatus

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..adapter_admin import AdapterAdmin, AdminError
from ..api_key import bearer_key_matches
from . import STATUS_TO_CODE, load_protos

pb, services = load_protos()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tenfold"].full_name


class TenfoldServicer(services.TenfoldServicer):
    def __init__(self, admin: AdapterAdmin):
        self.admin = admin

    async def _abort(self, context, e: AdminError):
        await context.abort(STATUS_TO_CODE.get(e.status, grpc.StatusCode.INTERNAL), str(e))

    def _authorize(self, context, admin_call: bool):
        key = self.admin.settings.api_key
        if not key or not (admin_call or self.admin.settings.protect_all):
            return None
        if bearer_key_matches(dict(context.invocation_metadata()).get("authorization"), key):
            return None
        return AdminError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (metadata authorization: Bearer <key>)")

    def _sampling(self, request):
        from vllm import SamplingParams

        s = request.sampling
        kwargs = {"max_tokens": s.max_tokens or 16, "stop": list(s.stop) or None, "ignore_eos": s.ignore_eos}
        for field in ("temperature", "top_p", "seed"):
            if s.HasField(field):
                kwargs[field] = getattr(s, field)
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise AdminError(HTTPStatus.BAD_REQUEST, f"invalid sampling parameters: {e}") from None

    async def _stream(self, request, context):
        """Yields vLLM RequestOutputs; aborts the engine request if the call ends early (cancel, disconnect)."""
        denied = self._authorize(context, admin_call=False)
        if denied:
            raise denied
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise AdminError(HTTPStatus.BAD_REQUEST, "a prompt is required: set text or token_ids")
        prompt = {"prompt": request.text} if kind == "text" else {"prompt_token_ids": list(request.token_ids.ids)}
        params = self._sampling(request)
        lora = await self.admin.lora_request(request.adapter)
        request_id = f"grpc-{uuid.uuid4().hex}"
        engine = self.admin.state.engine_client
        finished = False
        try:
            async for output in engine.generate(prompt, params, request_id, lora_request=lora):
                finished = output.finished
                yield output
        except ValueError as e:  # vLLM's request validation (e.g. prompt too long)
            raise AdminError(HTTPStatus.BAD_REQUEST, str(e)) from None
        finally:
            if not finished:
                await engine.abort(request_id)

    @staticmethod
    def _usage(output):
        return pb.Usage(prompt_tokens=len(output.prompt_token_ids or []),
                        completion_tokens=len(output.outputs[0].token_ids))

    async def Generate(self, request, context):
        last = None
        try:
            async for output in self._stream(request, context):
                last = output
        except AdminError as e:
            await self._abort(context, e)
        completion = last.outputs[0]
        return pb.GenerateResponse(text=completion.text, token_ids=list(completion.token_ids),
                                   finish_reason=completion.finish_reason or "", usage=self._usage(last))

    async def GenerateStream(self, request, context):
        sent_text, sent_tokens = 0, 0
        try:
            async for output in self._stream(request, context):
                completion = output.outputs[0]
                # vLLM's cumulative output shares its token list with the request's state, which grows while this
                # generator waits at its yield: take the snapshot and the sent counts before yielding
                text, token_ids = completion.text, list(completion.token_ids)
                chunk = pb.GenerateResponse(
                    text=text[sent_text:], token_ids=token_ids[sent_tokens:],
                    finish_reason=completion.finish_reason or "" if output.finished else "",
                    usage=pb.Usage(prompt_tokens=len(output.prompt_token_ids or []), completion_tokens=len(token_ids)))
                sent_text, sent_tokens = len(text), len(token_ids)
                yield chunk
        except AdminError as e:
            await self._abort(context, e)

    async def ListAdapters(self, request, context):
        denied = self._authorize(context, admin_call=False)
        if denied:
            await self._abort(context, denied)
        return pb.ListAdaptersResponse(adapters=[_adapter(a) for a in await self.admin.list()])

    async def LoadAdapter(self, request, context):
        try:
            denied = self._authorize(context, admin_call=True)
            if denied:
                raise denied
            return _adapter(await self.admin.load(request.name, request.path or None))
        except AdminError as e:
            await self._abort(context, e)

    async def UnloadAdapter(self, request, context):
        try:
            denied = self._authorize(context, admin_call=True)
            if denied:
                raise denied
            await self.admin.unload(request.name)
        except AdminError as e:
            await self._abort(context, e)
        return pb.UnloadAdapterResponse()

    async def PinAdapter(self, request, context):
        try:
            denied = self._authorize(context, admin_call=True)
            if denied:
                raise denied
            return _adapter(await self.admin.pin(request.name))
        except AdminError as e:
            await self._abort(context, e)

    async def UnpinAdapter(self, request, context):
        try:
            denied = self._authorize(context, admin_call=True)
            if denied:
                raise denied
            await self.admin.unpin(request.name)
        except AdminError as e:
            await self._abort(context, e)
        return pb.UnpinAdapterResponse()


def _adapter(facts: dict):
    return pb.Adapter(**{k: v for k, v in facts.items() if k in ("name", "path", "family", "rank", "params", "bytes",
                                                                 "residency", "tiers", "pinned")})


async def start(admin: AdapterAdmin, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    services.add_TenfoldServicer_to_server(TenfoldServicer(admin), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server
