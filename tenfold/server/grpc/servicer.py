"""The gRPC servicer: Generate / GenerateStream on the shared vLLM engine, adapter admin through AdapterAdmin, plus
the standard health service and server reflection."""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..access import grpc_method_is_open, is_admin
from ..adapter_admin import AdapterAdmin, AdminError
from ..api_key import bearer_key_matches
from . import STATUS_TO_CODE, load_protos

pb, services = load_protos()
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tenfold"].full_name
logger = logging.getLogger(__name__)


class TenfoldServicer(services.TenfoldServicer):
    """The key is checked before any method runs (`KeyInterceptor`); every failure ends the call with a status and a
    message: AdminError by its HTTP status, a dead engine UNAVAILABLE, anything else INTERNAL (no traceback)."""

    def __init__(self, admin: AdapterAdmin):
        self.admin = admin

    async def _abort(self, context, e: Exception):
        code, message = _status(e)
        await context.abort(code, message)

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
        from vllm.v1.engine.exceptions import EngineDeadError

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
        finally:
            if not finished:
                try:
                    await engine.abort(request_id)
                except EngineDeadError:  # nothing left to abort
                    pass

    @staticmethod
    def _usage(output):
        return pb.Usage(prompt_tokens=len(output.prompt_token_ids or []),
                        completion_tokens=len(output.outputs[0].token_ids))

    async def Generate(self, request, context):
        last = None
        try:
            async for output in self._stream(request, context):
                last = output
        except Exception as e:
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
        except Exception as e:
            await self._abort(context, e)

    async def ListAdapters(self, request, context):
        with_paths = is_admin(_authorization(context.invocation_metadata()), self.admin.settings.api_key)
        try:
            adapters = await self.admin.list(with_paths=with_paths)
        except Exception as e:
            await self._abort(context, e)
        return pb.ListAdaptersResponse(adapters=[_adapter(a) for a in adapters])

    async def LoadAdapter(self, request, context):
        try:
            return _adapter(await self.admin.load(request.name, request.path or None))
        except Exception as e:
            await self._abort(context, e)

    async def UnloadAdapter(self, request, context):
        try:
            await self.admin.unload(request.name)
        except Exception as e:
            await self._abort(context, e)
        return pb.UnloadAdapterResponse()

    async def PinAdapter(self, request, context):
        try:
            return _adapter(await self.admin.pin(request.name))
        except Exception as e:
            await self._abort(context, e)

    async def UnpinAdapter(self, request, context):
        try:
            await self.admin.unpin(request.name)
        except Exception as e:
            await self._abort(context, e)
        return pb.UnpinAdapterResponse()


def _adapter(facts: dict):
    return pb.Adapter(**{k: v for k, v in facts.items() if k in ("name", "path", "family", "rank", "params", "bytes",
                                                                 "residency", "tiers", "pinned")})


def _authorization(metadata) -> str | None:
    return dict(metadata or ()).get("authorization")


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMNotFoundError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, AdminError):
        return STATUS_TO_CODE.get(e.status, grpc.StatusCode.INTERNAL), str(e)
    if isinstance(e, GracefulHTTPError):  # e.g. the engine's queue is full
        return STATUS_TO_CODE.get(HTTPStatus(e.http_status), grpc.StatusCode.UNAVAILABLE), str(e)
    if isinstance(e, (VLLMClientError, ValueError)):  # vLLM's request validation (e.g. prompt too long)
        return (grpc.StatusCode.NOT_FOUND if isinstance(e, VLLMNotFoundError) else grpc.StatusCode.INVALID_ARGUMENT,
                str(e))
    if isinstance(e, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, "the engine stopped: this server is shutting down; retry on another"
    logger.exception("gRPC call failed")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the server's log has the details"


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """With --api-key, every method needs `authorization: Bearer <key>` except the open ones (`access.py`)."""

    def __init__(self, api_key: str, protect_all: bool):
        self.api_key = api_key
        self.protect_all = protect_all

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or grpc_method_is_open(details.method, self.protect_all)
                or bearer_key_matches(_authorization(details.invocation_metadata), self.api_key)):
            return handler
        return _refusing(handler)


def _refusing(handler):
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED before reading anything."""
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key (metadata authorization: Bearer <key>)")

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


async def start(admin: AdapterAdmin, host: str, port: int, tls: tuple[bytes, bytes] | None = None) -> grpc.aio.Server:
    """`tls`: (certificate chain, private key), PEM: the port serves TLS only."""
    settings = admin.settings
    server = grpc.aio.server(interceptors=[KeyInterceptor(settings.api_key, settings.protect_all)]
                             if settings.api_key else None)
    services.add_TenfoldServicer_to_server(TenfoldServicer(admin), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {address}")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server
