"""HTTP additions to vLLM's OpenAI app: adapter admin (REST /v1/adapters), adapter facts in /v1/models, the access
guard (`access.py`), path/name rules for vLLM's own /v1/load_lora_adapter, and the removal of vLLM's SageMaker
adapter and invocation routes.

Status codes: 400 unusable adapter or malformed request, 401 missing/wrong key, 404 unknown adapter or path,
409 name already loaded or no room to pin, 413 adapter over the size limit.
"""

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.middleware import Middleware

from .access import AccessGuard, error, is_admin
from .adapter_admin import AdapterAdmin, AdminError, ServeSettings, resolve_runtime_path

# vLLM mounts SageMaker's routes because `tenfold serve` turns runtime LoRA updating on: `/adapters` loads any path
# (no --adapter-root, no name rules) and `/invocations` is a second door to generation; tenfold serves neither
UNMOUNTED = {"/adapters", "/adapters/{adapter_name}", "/invocations"}


class LoadAdapter(BaseModel):
    name: str
    path: str | None = None


def install(app: FastAPI, admin: AdapterAdmin, residency=None) -> None:
    # imported here (`tenfold inspect` imports this module and needs none of vLLM's server); annotations in this
    # module are evaluated at definition (no `from __future__ import annotations`): FastAPI finds a route's request
    # body by its annotation's class, which a string naming this local import would not give it
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
    from vllm.entrypoints.serve.utils.api_utils import validate_json_request

    settings: ServeSettings = admin.settings
    router = APIRouter()

    @router.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": await admin.list(with_paths=True)}

    async def answered(call, done=None):
        """The admin call's result (or `done` once it returned), or its AdminError as an HTTP error."""
        try:
            result = await call
        except AdminError as e:
            return error(e.status, str(e))
        return result if done is None else done

    @router.post("/v1/adapters")
    async def load(body: LoadAdapter):
        return await answered(admin.load(body.name, body.path))

    @router.delete("/v1/adapters/{name}")
    async def unload(name: str):
        return await answered(admin.unload(name), {"unloaded": name})

    @router.post("/v1/adapters/{name}/pin")
    async def pin(name: str):
        return await answered(admin.pin(name))

    @router.delete("/v1/adapters/{name}/pin")
    async def unpin(name: str):
        return await answered(admin.unpin(name), {"unpinned": name})

    @router.get("/v1/models")
    async def list_models(request: Request):
        with_paths = is_admin(request.headers.get("authorization"), settings.api_key)
        listing = (await admin.models.show_available_models()).model_dump()
        described = {a["name"]: a for a in await admin.list(with_paths=with_paths)}
        for card in listing["data"]:
            if not with_paths:
                card["root"] = None  # vLLM's cards name the model's and each adapter's directory
            if card["id"] in described:
                card["adapter"] = described[card["id"]]
        return listing

    @router.post("/v1/load_lora_adapter", dependencies=[Depends(validate_json_request)])
    async def load_lora_adapter(request: LoadLoRAAdapterRequest):
        """vLLM's route, with tenfold's name rules and --adapter-root confinement."""
        try:
            resolve_runtime_path(settings, request.lora_name, request.lora_path or None)
        except AdminError as e:
            return error(e.status, str(e))
        response = await admin.models.load_lora_adapter(request)
        if isinstance(response, ErrorResponse):
            return JSONResponse(response.model_dump(), status_code=response.error.code)
        return Response(status_code=200, content=response)

    ours = [(route.path, method) for route in router.routes for method in route.methods]
    app.router.routes[:] = [r for r in app.router.routes if not _replaced(r, ours)]
    app.include_router(router)

    # vLLM's app has already built its middleware stack: add ours outermost and let Starlette rebuild it lazily
    if residency is not None:
        app.user_middleware.insert(0, Middleware(RefreshBeforeScrape, residency=residency))
    app.user_middleware.insert(0, Middleware(AccessGuard, api_key=settings.api_key, protect_all=settings.protect_all))
    app.middleware_stack = None


def _replaced(route, ours: list[tuple[str, str]]) -> bool:
    """Whether a route of vLLM's app is unmounted, or replaced by one of ours (same path and method)."""
    path = getattr(route, "path", None)
    methods = getattr(route, "methods", None) or ()
    return path in UNMOUNTED or any((path, method) in ours for method in methods)


class RefreshBeforeScrape:
    """ASGI middleware: a /metrics scrape first reads the workers' residency ledger (`metrics.ResidencyTracker`)."""

    def __init__(self, app, residency):
        self.app = app
        self.residency = residency

    async def __call__(self, scope, receive, send):
        from starlette._utils import get_route_path

        if scope["type"] == "http" and get_route_path(scope).startswith("/metrics"):
            await self.residency.refresh()
        await self.app(scope, receive, send)
