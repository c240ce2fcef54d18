"""The cluster's gRPC front door: tenfold's gRPC API (tenfold.proto) on Ray Serve's gRPC proxy, with the meaning a
single `tenfold serve` gives it.

Serve's proxy calls the ingress deployment's method named like the RPC with the request message. Generation goes to
a replica chosen by the request's adapter (Serve's multiplexed model id, as over HTTP) and from there to its engine's
own gRPC server, so messages, errors and status codes are the single engine's; a stream that breaks (the replica or
its engine died) or ends before the engine's last message (the one with a finish reason) ends with UNAVAILABLE, and
so does a call whose replica failed. Admin calls run the ingress's
transport-neutral admin steps (every replica, the registry) and map their HTTP statuses to gRPC codes. Trailing
metadata names the replica that served a generation and whether that request loaded its adapter there.
"""

from __future__ import annotations

import json

import grpc

from ..server.grpc import STATUS_TO_CODE, load_protos

pb, services = load_protos()
# the import path Serve's gRPC proxy registers (`grpc_servicer_functions`); it must not pull in vLLM
add_TenfoldServicer_to_server = services.add_TenfoldServicer_to_server
SERVICER_FUNCTION = f"{__name__}.add_TenfoldServicer_to_server"


class StreamFailed(Exception):
    """Ends a gRPC stream with the code set on its context."""


STREAM_ENDED_EARLY = "the stream ended before the engine finished it; retry it"


def replica_failure(e: Exception) -> str:
    """What a caller is told when the replica serving its request failed (answered 503 or UNAVAILABLE)."""
    return f"the replica serving this request failed ({type(e).__name__}); retry it"


def code_of(status: int) -> grpc.StatusCode:
    return STATUS_TO_CODE.get(status, grpc.StatusCode.UNKNOWN if status < 500 else grpc.StatusCode.UNAVAILABLE)


def parsed_body(content: bytes) -> dict:
    """An engine's JSON answer; a body that is not JSON becomes an error message."""
    try:
        return json.loads(content)
    except ValueError:
        return {"error": {"message": content.decode(errors="replace")}}


def message_of(body) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)


def adapter_message(facts: dict):
    return pb.Adapter(**{k: v for k, v in facts.items() if k in pb.Adapter.DESCRIPTOR.fields_by_name
                         and v is not None})


class GrpcIngressMethods:
    """The RPCs of tenfold.proto on the ingress; the class they join provides `engines`, `affinity` and the admin
    steps (`_admin_list`, `_admin_load`, `_admin_unload`, `_admin_pin`, `_admin_unpin`, `_admin_denied`)."""

    @staticmethod
    def _metadata(grpc_context) -> dict:
        return {k: v for k, v in grpc_context.invocation_metadata() if k == "authorization"}

    @staticmethod
    def _fail(grpc_context, status: int, body) -> None:
        grpc_context.set_code(code_of(status))
        grpc_context.set_details(message_of(body))

    @staticmethod
    def _served_by(grpc_context, head: dict) -> None:
        grpc_context.set_trailing_metadata([("x-tenfold-replica", head["replica"]),
                                            ("x-tenfold-adapter-loaded", "1" if head["loaded"] else "0")])

    def _generation_handle(self, adapter: str):
        return self.engines.options(multiplexed_model_id=adapter) if self.affinity and adapter else self.engines

    async def Generate(self, request, grpc_context):
        try:
            head, payload = await self._generation_handle(request.adapter).forward_grpc.remote(
                request.adapter, "Generate", request.SerializeToString(), self._metadata(grpc_context))
        except Exception as e:  # the replica died or was replaced under this request
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(replica_failure(e))
            return pb.GenerateResponse()
        self._served_by(grpc_context, head)
        if head["code"]:
            grpc_context.set_code(grpc.StatusCode[head["code"]])
            grpc_context.set_details(head["details"])
            return pb.GenerateResponse()
        return pb.GenerateResponse.FromString(payload)

    async def GenerateStream(self, request, grpc_context):
        chunks = self._generation_handle(request.adapter).options(stream=True).forward_grpc_stream.remote(
            request.adapter, "GenerateStream", request.SerializeToString(), self._metadata(grpc_context))
        finished, failure = False, None
        try:
            async for item in chunks:
                if isinstance(item, dict):  # the head, or the engine's error after it
                    if "replica" in item:
                        self._served_by(grpc_context, item)
                    if item["code"]:
                        failure = grpc.StatusCode[item["code"]], item["details"]
                        break
                    continue
                message = pb.GenerateResponse.FromString(item)
                finished = bool(message.finish_reason)
                yield message
            else:
                if not finished:
                    failure = grpc.StatusCode.UNAVAILABLE, STREAM_ENDED_EARLY
        except Exception as e:
            failure = grpc.StatusCode.UNAVAILABLE, replica_failure(e)
        if failure is not None:
            grpc_context.set_code(failure[0])
            grpc_context.set_details(failure[1])
            # Serve's proxy passes a stream's code on with its next message or an exception, not when it just ends
            raise StreamFailed(failure[1])

    async def ListAdapters(self, request, grpc_context):
        # a single engine lists adapters to any caller it serves (generation's key rule), not only to admins
        status, body = await self._admin_list(self._metadata(grpc_context), admin=False)
        if status != 200:
            self._fail(grpc_context, status, body)
            return pb.ListAdaptersResponse()
        return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in body["adapters"]])

    async def LoadAdapter(self, request, grpc_context):
        status, body, _ = await self._admin_load(self._metadata(grpc_context), request.name, request.path or None)
        if status != 200:
            self._fail(grpc_context, status, body)
            return pb.Adapter()
        return adapter_message(body)

    async def UnloadAdapter(self, request, grpc_context):
        status, body = await self._admin_unload(self._metadata(grpc_context), request.name)
        if status != 200:
            self._fail(grpc_context, status, body)
        return pb.UnloadAdapterResponse()

    async def PinAdapter(self, request, grpc_context):
        status, body = await self._admin_pin(self._metadata(grpc_context), request.name)
        if status != 200:
            self._fail(grpc_context, status, body)
            return pb.Adapter()
        return adapter_message(body)

    async def UnpinAdapter(self, request, grpc_context):
        status, body = await self._admin_unpin(self._metadata(grpc_context), request.name)
        if status != 200:
            self._fail(grpc_context, status, body)
        return pb.UnpinAdapterResponse()
