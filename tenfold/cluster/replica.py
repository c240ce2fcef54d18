"""One tenfold engine as a Ray Serve replica.

Each replica runs an ordinary `tenfold serve` process on its node (the same engine, routes, errors and metrics as a
single server) and forwards the ingress's requests to it. The server listens on the node's address (loopback when the
cluster is one machine), runs in a process group of its own that stopping the replica stops as a whole, and stops
itself if the replica's process dies. An engine that stopped serving makes its requests fail as the replica's
(503, UNAVAILABLE), not as the request's. Adapters are Ray Serve multiplexed models: the replica
reports the adapters it holds, Serve routes a request carrying `multiplexed_model_id=<adapter>` to a replica that
holds it, and Serve's per-replica LRU (sized to the engine's host cache, `--max-cpu-loras`) decides evictions, which
unload the adapter from the engine so that what Serve routes by and what the engine holds stay the same (pins
take room in the engine's cache but not in Serve's count, so an admin load checks that the workers hold it). gRPC calls
go to the engine's own gRPC server (raw messages, the caller's authorization), so their answers are the engine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from ray import serve

from ..engine.parent_watch import ENV as PARENT_ENV
from .process_group import stop_group
from .registry import REGISTRY_NAMESPACE

STARTUP_TIMEOUT_SECONDS = 900
STOP_GRACE_SECONDS = 20  # the server's SIGTERM drain, before its process group gets SIGKILL
HEALTH_TIMEOUT_SECONDS = 5
# what an engine's gRPC call ends with when the engine, not the request, failed
ENGINE_FAILURE_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.CANCELLED)
GRPC_SERVICE = "tenfold.v1.Tenfold"  # tenfold.proto's package and service
REPLICA_HEADER = "x-tenfold-replica"
LOADED_HEADER = "x-tenfold-adapter-loaded"  # "1": this request loaded its adapter on the replica (a miss)


class AdapterUnavailable(Exception):
    """The replica's engine refused to load the adapter; carries the engine's own answer."""

    def __init__(self, status: int, body: bytes):
        super().__init__(body.decode(errors="replace"))
        self.status, self.body = status, body


class EngineUnavailable(Exception):
    """The replica's engine stopped serving (its process died, or its engine core did): the request is the
    replica's failure, which the ingress answers 503 with Retry-After while Serve replaces the replica."""


class ResidentAdapter:
    """What Serve's multiplexer caches per adapter; when Serve evicts it, the engine unloads it (unless pinned)."""

    def __init__(self, replica: EngineReplicaBase, name: str):
        self.replica, self.name = replica, name
        # Serve's multiplexer awaits a model's `__del__` when it evicts it. An instance attribute, not a method: the
        # garbage collector calls the class's __del__, and an async one there makes a coroutine nobody awaits.
        self.__del__ = self.unload

    async def unload(self) -> None:
        await self.replica.unload_evicted(self.name)


class EngineReplicaBase:
    """The replica's body; `replica_class` adds Serve's multiplexed loader sized to the engine's cache."""

    def __init__(self, serve_argv: list[str], api_key: str | None, local: bool, log_dir: str, registry_name: str):
        import ray

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.registry = ray.get_actor(registry_name, namespace=REGISTRY_NAMESPACE)
        # the engine listens where the ingress, on any node, reaches it: loopback when the cluster is this machine
        bind_host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        with _socket_bound(bind_host) as port, _socket_bound(bind_host) as grpc_port:
            self.url = f"http://{bind_host}:{port}"
            self.grpc_target = f"{bind_host}:{grpc_port}"
            argv = [sys.executable, "-m", "tenfold.cli", "serve", *serve_argv, "--host", bind_host,
                    "--port", str(port), "--grpc-port", str(grpc_port)]
        self.log_path = Path(log_dir) / f"replica-{self.replica_id}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        # a session of its own: stopping the replica stops the server's whole process group (engine core, workers);
        # the server stops itself if this actor's process dies without stopping it
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, PARENT_ENV: str(os.getpid())})
        ray.get(self.registry.add_engine.remote(self.replica_id, ray.get_runtime_context().get_node_id(),
                                                self.process.pid))
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop_engine()
            raise
        self.client = httpx.AsyncClient(base_url=self.url, timeout=None)
        self.grpc_channel: grpc.aio.Channel | None = None  # opened on first use, in the replica's event loop
        ray.get(self.registry.add_replica.remote(self.replica_id, self.url))
        for name in ray.get(self.registry.pins.remote()):  # pins made at runtime before this replica started
            response = httpx.post(f"{self.url}/v1/adapters/{name}/pin", headers=self.headers, timeout=600)
            if response.status_code != 200:
                raise RuntimeError(f"replica {self.replica_id}: pinning {name!r} failed: {response.text}")

    def _wait_until_healthy(self) -> None:
        deadline = time.time() + STARTUP_TIMEOUT_SECONDS
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica engine exited with {self.process.returncode} during start-up:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"replica engine did not answer /health within {STARTUP_TIMEOUT_SECONDS} s")

    # --- Serve hooks -------------------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this periodically: an engine process that died fails it, and Serve replaces the replica."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the replica's engine exited with {self.process.returncode}")

    def __del__(self):  # Serve calls it when it stops the replica (shutdown, replacement); the collector again
        self.stop_engine()

    def stop_engine(self) -> None:
        """Stops the engine's whole process group and waits for it (at most once)."""
        process = getattr(self, "process", None)
        if process is None or getattr(self, "engine_stopped", False):
            return
        self.engine_stopped = True
        self.registry.remove_replica.remote(self.replica_id)  # admin calls no longer reach it
        if stop_group(process.pid, STOP_GRACE_SECONDS):
            self.registry.remove_engine.remote(self.replica_id)  # else the cluster's stop tries again
        process.poll()  # reap the server

    # --- adapters ----------------------------------------------------------------------------------------------------
    async def load_adapter(self, name: str) -> ResidentAdapter:
        path = await self.registry.path_of.remote(name)
        response = await self.client.post("/v1/adapters", json={"name": name, "path": path}, headers=self.headers)
        if response.status_code not in (200, 409):  # 409: the engine has it already (a start-up --adapter)
            raise AdapterUnavailable(response.status_code, response.content)
        return ResidentAdapter(self, name)

    async def unload_evicted(self, name: str) -> None:
        pinned = await self.registry.pins.remote()
        if name not in pinned:
            try:
                await self.client.delete(f"/v1/adapters/{name}", headers=self.headers)
            except httpx.TransportError:  # the engine is gone, and its adapters with it
                pass

    async def adapter_for_request(self, get_model, name: str) -> tuple[bool, bytes | None, int]:
        """Makes this request's adapter resident through Serve's multiplexer (also when the ingress routed it without
        affinity); (loaded now, error body, status)."""
        if not name:
            return False, None, 200
        # Serve's multiplexer keeps its models on this object; absent before the first load
        cached = getattr(getattr(self, "__serve_multiplex_wrapper", None), "models", {})
        loaded = name not in cached
        try:
            await get_model(name)
        except AdapterUnavailable as e:
            return False, e.body, e.status
        return loaded, None, 200

    # --- engine failures ---------------------------------------------------------------------------------------------
    async def _engine_serving(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            return (await self.client.get("/health", timeout=HEALTH_TIMEOUT_SECONDS)).status_code == 200
        except httpx.TransportError:
            return False

    async def _raise_if_engine_failed(self, status: int) -> None:
        """A 5xx from an engine that no longer serves (vLLM answers 500 when its engine core died) is the replica's
        failure, not the request's."""
        if status >= 500 and not await self._engine_serving():
            raise EngineUnavailable(f"replica {self.replica_id}: its engine stopped serving")

    async def _grpc_failure(self, e: grpc.aio.AioRpcError) -> tuple[str, str]:
        """The code and details the caller gets for an engine's gRPC error: UNAVAILABLE when the engine failed."""
        if e.code() in ENGINE_FAILURE_CODES and not await self._engine_serving():
            return grpc.StatusCode.UNAVAILABLE.name, (f"the replica's engine stopped serving ({e.code().name}: "
                                                      f"{e.details()}); retry the request")
        return e.code().name, e.details() or ""

    # --- forwarding --------------------------------------------------------------------------------------------------
    def _headers(self, headers: dict, loaded: bool) -> dict:
        return {**headers, REPLICA_HEADER: self.replica_id, LOADED_HEADER: "1" if loaded else "0"}

    async def _forward(self, get_model, adapter: str, method: str, path: str, headers: dict,
                       body: bytes) -> tuple[int, dict, bytes]:
        loaded, error, status = await self.adapter_for_request(get_model, adapter)
        if error is not None:
            return status, self._headers({"content-type": "application/json"}, loaded), error
        response = await self.client.request(method, path, headers=headers, content=body)
        await self._raise_if_engine_failed(response.status_code)
        kept = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "retry-after")}
        return response.status_code, self._headers(kept, loaded), response.content

    async def _load_resident(self, get_model, name: str, headers: dict) -> tuple[int, dict, bytes]:
        """An admin load: the adapter resident in this replica's workers, answered with the engine's listing. Serve's
        multiplexer may still count an adapter that the engine's own cache evicted (pins take room in that cache but
        not in Serve's count): one generated token brings it back into the workers."""
        status, out_headers, content = await self._forward(get_model, name, "GET", "/v1/adapters", headers, b"")
        if status == 200 and not _has_host_tier(content, name):
            warm = await self.client.post("/v1/completions", headers=self.headers,
                                          json={"model": name, "prompt": [0], "max_tokens": 1})
            if warm.status_code != 200:
                return warm.status_code, self._headers({"content-type": "application/json"}, False), warm.content
            response = await self.client.get("/v1/adapters", headers=headers)
            status, content = response.status_code, response.content
        return status, out_headers, content

    def _grpc_call(self, method: str, stream: bool):
        """A call of the engine's gRPC method on raw message bytes."""
        if self.grpc_channel is None:
            self.grpc_channel = grpc.aio.insecure_channel(self.grpc_target)
        make = self.grpc_channel.unary_stream if stream else self.grpc_channel.unary_unary
        return make(f"/{GRPC_SERVICE}/{method}")

    def _grpc_head(self, loaded: bool, code: str | None = None, details: str = "") -> dict:
        return {"replica": self.replica_id, "loaded": loaded, "code": code, "details": details}

    async def _forward_grpc(self, get_model, adapter: str, method: str, request: bytes,
                            metadata: dict) -> tuple[dict, bytes | None]:
        """(head: replica, loaded, the engine's status code name or None, details; the response message's bytes)."""
        loaded, error, status = await self.adapter_for_request(get_model, adapter)
        if error is not None:
            return self._grpc_head(loaded, *_grpc_error(status, error)), None
        try:
            payload = await self._grpc_call(method, stream=False)(request, metadata=tuple(metadata.items()))
        except grpc.aio.AioRpcError as e:
            return self._grpc_head(loaded, *await self._grpc_failure(e)), None
        return self._grpc_head(loaded), payload

    async def _forward_grpc_stream(self, get_model, adapter: str, method: str, request: bytes, metadata: dict):
        """Yields the head first, then each response message's bytes; an error after the head as a last dict."""
        loaded, error, status = await self.adapter_for_request(get_model, adapter)
        if error is not None:
            yield self._grpc_head(loaded, *_grpc_error(status, error))
            return
        yield self._grpc_head(loaded)
        call = self._grpc_call(method, stream=True)(request, metadata=tuple(metadata.items()))
        try:
            async for payload in call:
                yield payload
        except grpc.aio.AioRpcError as e:
            code, details = await self._grpc_failure(e)
            yield {"code": code, "details": details}
        finally:
            call.cancel()  # the client went away: the engine aborts the request

    async def _forward_stream(self, get_model, adapter: str, method: str, path: str, headers: dict, body: bytes):
        """Yields (status, headers) first, then the body's chunks as the engine sends them (a connection that breaks
        raises here: the ingress ends the stream with an error event)."""
        loaded, error, status = await self.adapter_for_request(get_model, adapter)
        if error is not None:
            yield status, self._headers({"content-type": "application/json"}, loaded)
            yield error
            return
        async with self.client.stream(method, path, headers=headers, content=body) as response:
            await self._raise_if_engine_failed(response.status_code)
            kept = {k: v for k, v in response.headers.items() if k.lower() == "content-type"}
            yield response.status_code, self._headers(kept, loaded)
            async for chunk in response.aiter_raw():
                yield chunk


def replica_class(max_adapters: int):
    """The replica deployment's class, with Serve's multiplexed loader holding at most `max_adapters` adapters."""

    class EngineReplica(EngineReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_model(self, name: str) -> ResidentAdapter:
            return await self.load_adapter(name)

        async def forward(self, adapter: str, method: str, path: str, headers: dict, body: bytes):
            """One request to this replica's engine; `adapter` ("" for none) is made resident first."""
            return await self._forward(self.get_model, adapter, method, path, headers, body)

        async def load_resident(self, name: str, headers: dict):
            return await self._load_resident(self.get_model, name, headers)

        async def forward_stream(self, adapter: str, method: str, path: str, headers: dict, body: bytes):
            async for item in self._forward_stream(self.get_model, adapter, method, path, headers, body):
                yield item

        async def forward_grpc(self, adapter: str, method: str, request: bytes, metadata: dict):
            return await self._forward_grpc(self.get_model, adapter, method, request, metadata)

        async def forward_grpc_stream(self, adapter: str, method: str, request: bytes, metadata: dict):
            async for item in self._forward_grpc_stream(self.get_model, adapter, method, request, metadata):
                yield item

    return EngineReplica


def _has_host_tier(listing: bytes, name: str) -> bool:
    facts = next((a for a in json.loads(listing)["adapters"] if a["name"] == name), {})
    return "host" in facts.get("tiers", [])


def _grpc_error(status: int, body: bytes) -> tuple[str, str]:
    """The gRPC code name and details a single engine gives the HTTP error its adapter load returned."""
    from .grpc_ingress import code_of, message_of, parsed_body

    return code_of(status).name, message_of(parsed_body(body))


class _socket_bound:
    """A free port on `host` (bound, then released just before the engine binds it)."""

    def __init__(self, host: str):
        import socket

        self.socket = socket.socket()
        self.socket.bind((host, 0))

    def __enter__(self) -> int:
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()
