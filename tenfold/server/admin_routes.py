"""HTTP additions to vLLM's OpenAI app: adapter admin (REST /v1/adapters), adapter facts in /v1/models, API-key
protection of admin routes, and path/name rules for vLLM's own /v1/load_lora_adapter.

Status codes: 400 unusable adapter or malformed request, 401 missing/wrong key, 404 unknown adapter or path,
409 name already loaded or no room to pin, 413 adapter over the size limit.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware

from .adapter_admin import AdapterAdmin, AdminError, ServeSettings, resolve_runtime_path
from .api_key import bearer_key_matches

ADMIN_PATHS = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class LoadAdapter(BaseModel):
    name: str
    path: str | None = None


def error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": status.phrase, "code": status.value}},
                        status_code=status.value)


def install(app: FastAPI, admin: AdapterAdmin, residency=None) -> None:
    settings: ServeSettings = admin.settings
    router = APIRouter()

    @router.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": await admin.list()}

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
    async def list_models():
        listing = (await admin.models.show_available_models()).model_dump()
        by_name = admin.models.lora_requests
        for card in listing["data"]:
            if card["id"] in by_name:
                card["adapter"] = await admin.describe(by_name[card["id"]])
        return listing

    app.include_router(router)
    # our /v1/models must win over vLLM's, which was registered first
    ours = [r for r in app.router.routes if getattr(r, "endpoint", None) is list_models]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]

    async def guard(request: Request, call_next):
        path = request.url.path
        if path == "/metrics" and residency is not None:
            await residency.refresh()
        if settings.api_key and path.startswith("/v1") and (path.startswith(ADMIN_PATHS) or settings.protect_all):
            if not bearer_key_matches(request.headers.get("authorization"), settings.api_key):
                return error(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")
        if path == "/v1/load_lora_adapter" and request.method == "POST":
            try:
                body = await request.json()
                resolve_runtime_path(settings, str(body.get("lora_name", "")), body.get("lora_path") or None)
            except AdminError as e:
                return error(e.status, str(e))
            except (ValueError, AttributeError):
                return error(HTTPStatus.BAD_REQUEST, "malformed JSON body")
        return await call_next(request)

    # vLLM's app has already built its middleware stack: add ours outermost and let Starlette rebuild it lazily
    app.user_middleware.insert(0, Middleware(BaseHTTPMiddleware, dispatch=guard))
    app.middleware_stack = None
