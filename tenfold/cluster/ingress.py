"""The cluster's one HTTP front door: the routes of a single `tenfold serve`, each request sent to an engine replica.

Generation requests (`/v1/completions`, `/v1/chat/completions`, streaming or not) carry their adapter name as Ray
Serve's multiplexed model id, so Serve routes them to a replica that already holds the adapter (affinity); with
affinity off they go to any replica, which loads the adapter itself. Admin calls reach every replica: a load records
its path for replicas that load the name later, an unload and a pin or unpin go to each replica's engine. Responses
name the replica that served them (`x-tenfold-replica`) and whether that request loaded its adapter there
(`x-tenfold-adapter-loaded`). A replica that fails before the response started answers 503 with Retry-After (the
client can retry, and Serve replaces the replica); a stream it cuts, or one that ends without the engine's
`data: [DONE]`, ends with an error event in OpenAI's shape and `data: [DONE]`, as vLLM ends a stream that fails. With
--api-key every route needs the key except `/health` and, without --protect-all, generation and the model list. The
admin steps are transport-neutral ((status, JSON body) from the caller's
authorization): the HTTP routes here and the gRPC methods (`grpc_ingress.py`) wrap the same steps.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ..server.access import AccessGuard
from ..server.api_key import bearer_key_matches
from .grpc_ingress import STREAM_ENDED_EARLY, GrpcIngressMethods, parsed_body, replica_failure
from .registry import REGISTRY_NAMESPACE

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ADMIN_TIMEOUT_SECONDS = 600
SSE_DONE = b"data: [DONE]"
SSE_EVENT_END = b"\n\n"


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or HTTPStatus(status).phrase, "param": None, "code": status}}


def error(status: int, message: str, retry: bool = False) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status,
                        headers={"Retry-After": "1"} if retry else None)


def ingress_class(api_key: str | None, protect_all: bool, affinity: bool, registry_name: str):
    app = FastAPI(title="tenfold cluster")
    if api_key:
        # deny by default, by a single engine's rule (server/access.py), on every route the ingress has and has not
        app.add_middleware(AccessGuard, api_key=api_key, protect_all=protect_all)

    @serve.ingress(app)
    class Ingress(GrpcIngressMethods):
        def __init__(self, engines):
            import ray

            self.engines = engines
            self.affinity = affinity
            self.registry = ray.get_actor(registry_name, namespace=REGISTRY_NAMESPACE)
            self.base_names: set[str] | None = None
            # the ingress's own calls to the engines carry the key: with --protect-all they refuse calls without it
            self.own_headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

        # --- helpers -----------------------------------------------------------------------------------------------
        def _admin_denied(self, headers: dict, admin: bool) -> tuple[int, dict] | None:
            if not api_key or not (admin or protect_all) or bearer_key_matches(headers.get("authorization"), api_key):
                return None
            return 401, error_body(401, "missing or wrong API key (Authorization: Bearer <key>)")

        async def _base(self) -> set[str]:
            """The served base model's names (asked of an engine once; a failed answer is not kept)."""
            if self.base_names is None:
                status, _, body = await self.engines.forward.remote("", "GET", "/v1/models", self.own_headers, b"")
                if status != 200:
                    raise RuntimeError(f"an engine answered {status} to the ingress's model listing")
                self.base_names = {c["id"] for c in json.loads(body)["data"] if "adapter" not in c}
            return self.base_names

        @staticmethod
        def _forwarded_headers(request: Request) -> dict:
            return {k.lower(): v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}

        async def _replicas(self) -> dict[str, str]:
            return await self.registry.replicas.remote()

        async def _each_replica(self, method: str, path: str, headers: dict, body: bytes = b"") -> dict:
            """The same admin call on every replica's engine; replica id -> (status, parsed body)."""
            answers = {}
            async with httpx.AsyncClient(timeout=ADMIN_TIMEOUT_SECONDS) as client:
                for replica_id, url in (await self._replicas()).items():
                    try:
                        response = await client.request(method, f"{url}{path}", content=body, headers=headers)
                    except httpx.TransportError:  # its engine died: Serve replaces the replica, which registers
                        await self.registry.remove_replica.remote(replica_id)  # anew and pins from the registry
                        continue
                    answers[replica_id] = (response.status_code, parsed_body(response.content))
            return answers

        # --- generation ----------------------------------------------------------------------------------------------
        async def _generate(self, request: Request) -> Response:
            body = await request.body()
            try:
                payload = json.loads(body)
                model, stream = str(payload.get("model", "")), bool(payload.get("stream", False))
            except (ValueError, AttributeError):  # the engine answers malformed bodies exactly as a single server
                model, stream = "", False
            headers = self._forwarded_headers(request)
            try:
                adapter = "" if not model or model in await self._base() else model
                handle = self.engines.options(multiplexed_model_id=adapter) if affinity and adapter else self.engines
                if not stream:
                    status, out_headers, content = await handle.forward.remote(adapter, "POST", request.url.path,
                                                                               headers, body)
                    return Response(content, status_code=status, headers=out_headers)
                chunks = handle.options(stream=True).forward_stream.remote(adapter, "POST", request.url.path,
                                                                           headers, body)
                status, out_headers = await chunks.__anext__()
            except Exception as e:  # the replica died or was replaced under this request
                return error(503, replica_failure(e), True)
            if status == 200 and out_headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(whole_events_or_error(chunks), status_code=status, headers=out_headers)
            return StreamingResponse(_rest(chunks), status_code=status, headers=out_headers)

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._generate(request)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._generate(request)

        @app.get("/v1/models")
        async def models(self, request: Request):
            status, headers, content = await self.engines.forward.remote("", "GET", "/v1/models",
                                                                         self._forwarded_headers(request), b"")
            return Response(content, status_code=status, headers=headers)

        @app.get("/health")
        async def health(self):
            return Response(status_code=200)

        @app.get("/v1/replicas")
        async def replicas(self, request: Request):
            """Each replica's engine URL: scrape its /metrics there (residency per adapter and tier)."""
            return {"replicas": await self._replicas()}  # behind the key (AccessGuard)

        # --- adapter admin: the steps, then their HTTP routes -----------------------------------------------------------
        async def _admin_list(self, headers: dict, admin: bool = True) -> tuple[int, dict]:
            denied = self._admin_denied(headers, admin)
            if denied:
                return denied
            # a caller without the key (gRPC's ListAdapters without --protect-all) never sees server paths
            hidden = ("path",) if api_key and not bearer_key_matches(headers.get("authorization"), api_key) else ()
            merged: dict[str, dict] = {}
            # the caller passed the ingress's rule; the engines list adapters to admins only
            answers = await self._each_replica("GET", "/v1/adapters", {**headers, **self.own_headers})
            for replica_id, (status, body) in answers.items():
                if status != 200:
                    return status, body
                for facts in body["adapters"]:
                    facts = {k: v for k, v in facts.items() if k not in hidden}
                    entry = merged.setdefault(facts["name"], {**facts, "replicas": {}})
                    entry["replicas"][replica_id] = {"tiers": facts.get("tiers", []), "pinned": facts.get("pinned")}
            return 200, {"adapters": list(merged.values())}

        async def _admin_load(self, headers: dict, name: str, path: str | None) -> tuple[int, dict, dict]:
            """(status, body, the serving replica's x-tenfold headers)."""
            denied = self._admin_denied(headers, admin=True)
            if denied:
                return (*denied, {})
            if path:
                await self.registry.set_path.remote(name, path)
            # loaded through Serve's multiplexer on one replica, which then reports it for routing
            handle = self.engines.options(multiplexed_model_id=name)
            status, out_headers, content = await handle.load_resident.remote(name, headers)
            replica_headers = {k: v for k, v in out_headers.items() if k.startswith("x-tenfold")}
            if status != 200:
                await self.registry.set_path.remote(name, None)
                return status, parsed_body(content), replica_headers
            facts = next((a for a in json.loads(content)["adapters"] if a["name"] == name), None)
            return 200, facts, replica_headers

        async def _admin_unload(self, headers: dict, name: str) -> tuple[int, dict]:
            denied = self._admin_denied(headers, admin=True)
            if denied:
                return denied
            answers = await self._each_replica("DELETE", f"/v1/adapters/{name}", headers)
            await self.registry.set_path.remote(name, None)
            await self.registry.set_pin.remote(name, False)
            if any(status == 200 for status, _ in answers.values()):
                return 200, {"unloaded": name, "replicas": sorted(r for r, (s, _) in answers.items() if s == 200)}
            return next(iter(answers.values()), (404, error_body(404, f"adapter {name!r} is not loaded")))

        async def _admin_pin(self, headers: dict, name: str) -> tuple[int, dict]:
            """Pins on every replica (each loads the adapter first); a replica that refuses undoes the others."""
            denied = self._admin_denied(headers, admin=True)
            if denied:
                return denied
            answers = await self._each_replica("POST", f"/v1/adapters/{name}/pin", headers)
            refused = {r: a for r, a in answers.items() if a[0] != 200}
            if refused or not answers:
                if len(refused) < len(answers):  # undo where it held (the others answer 404)
                    await self._each_replica("DELETE", f"/v1/adapters/{name}/pin", headers)
                return next(iter(refused.values()), (503, error_body(503, "no replica is up")))
            await self.registry.set_pin.remote(name, True)
            return 200, {**next(iter(answers.values()))[1], "replicas": sorted(answers)}

        async def _admin_unpin(self, headers: dict, name: str) -> tuple[int, dict]:
            denied = self._admin_denied(headers, admin=True)
            if denied:
                return denied
            await self.registry.set_pin.remote(name, False)
            answers = await self._each_replica("DELETE", f"/v1/adapters/{name}/pin", headers)
            if any(status == 200 for status, _ in answers.values()):
                return 200, {"unpinned": name}
            return 404, error_body(404, f"adapter {name!r} is not pinned")

        @app.get("/v1/adapters")
        async def list_adapters(self, request: Request):
            status, body = await self._admin_list(self._forwarded_headers(request))
            return JSONResponse(body, status_code=status)

        async def _load(self, request: Request, name: str, path: str | None) -> Response:
            status, body, headers = await self._admin_load(self._forwarded_headers(request), name, path)
            return JSONResponse(body, status_code=status, headers=headers)

        @app.post("/v1/adapters")
        async def load(self, request: Request):
            try:
                body = await request.json()
                name, path = str(body["name"]), body.get("path")
            except (ValueError, KeyError, TypeError):
                return error(400, "expected a JSON body {\"name\": ..., \"path\": (optional)}")
            return await self._load(request, name, path)

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(self, request: Request):
            try:
                body = await request.json()
                name, path = str(body["lora_name"]), body.get("lora_path")
            except (ValueError, KeyError, TypeError):
                return error(400, "expected a JSON body {\"lora_name\": ..., \"lora_path\": ...}")
            return await self._load(request, name, path)

        @app.delete("/v1/adapters/{name}")
        async def unload(self, request: Request, name: str):
            status, body = await self._admin_unload(self._forwarded_headers(request), name)
            return JSONResponse(body, status_code=status)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(self, request: Request):
            try:
                name = str((await request.json())["lora_name"])
            except (ValueError, KeyError, TypeError):
                return error(400, "expected a JSON body {\"lora_name\": ...}")
            status, body = await self._admin_unload(self._forwarded_headers(request), name)
            return JSONResponse(body, status_code=status)

        @app.post("/v1/adapters/{name}/pin")
        async def pin(self, request: Request, name: str):
            status, body = await self._admin_pin(self._forwarded_headers(request), name)
            return JSONResponse(body, status_code=status)

        @app.delete("/v1/adapters/{name}/pin")
        async def unpin(self, request: Request, name: str):
            status, body = await self._admin_unpin(self._forwarded_headers(request), name)
            return JSONResponse(body, status_code=status)

    Ingress.http_app = app  # its routes, for a check that walks them
    return Ingress


async def _rest(chunks):
    async for chunk in chunks:
        yield chunk


async def whole_events_or_error(chunks):
    """An engine's server-sent events, each passed on whole; a stream that breaks (the replica or its engine died) or
    ends without the engine's `data: [DONE]` ends with an error event and `data: [DONE]`, never a bare cut."""
    pending, done = b"", False
    try:
        async for chunk in chunks:
            pending += chunk
            *events, pending = pending.split(SSE_EVENT_END)
            for event in events:
                yield event + SSE_EVENT_END
                done = event.strip() == SSE_DONE
        failure = STREAM_ENDED_EARLY
    except Exception as e:  # the replica raised or died; a cancelled client is not an Exception and just leaves
        failure = replica_failure(e)
    if done and not pending.strip():
        return
    # a partial event is dropped: the client gets whole JSON events only
    body = error_body(503, failure, "ServiceUnavailableError")
    yield b"data: " + json.dumps(body).encode() + SSE_EVENT_END
    yield SSE_DONE + SSE_EVENT_END
