"""HTTP additions to vLLM's OpenAI app: adapter admin (REST /v1/adapters), adapter facts in /v1/models, API-key
protection of admin routes, and path/name rules for runtime loads.

Status codes: 400 unusable adapter or malformed request, 401 missing/wrong key, 404 unknown adapter or path,
409 name already loaded, 413 adapter over the size limit.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware

from ..engine.resolver import InvalidAdapterName, adapter_path

ADMIN_PATHS = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None
    protect_all: bool
    adapter_root: Path | None


class LoadAdapter(BaseModel):
    name: str
    path: str | None = None


def error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": status.phrase, "code": status.value}},
                        status_code=status.value)


def resolve_runtime_path(settings: ServeSettings, name: str, path: str | None) -> Path:
    """Runtime loads stay inside --adapter-root: by name, or by a path that resolves inside it."""
    if settings.adapter_root is None:
        raise PermissionError("runtime loads need --adapter-root (paths given at start-up with --adapter are fixed)")
    if path is None:
        return adapter_path(settings.adapter_root, name)
    root = settings.adapter_root.resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise PermissionError(f"path {path!r} is outside the adapter root")
    return resolved


def install(app: FastAPI, settings: ServeSettings) -> None:
    router = APIRouter()

    def models(request: Request):
        return request.app.state.openai_serving_models

    async def describe(request: Request, lora) -> dict:
        from ..engine.loader import convert_for_vllm
        from ..engine.vllm_compat import served_spec

        resident = await request.app.state.engine_client.list_loras()
        facts = {"name": lora.lora_name, "path": lora.lora_path,
                 "residency": "worker" if lora.lora_int_id in resident else "registered"}
        try:
            converted = convert_for_vllm(lora.lora_path, served_spec(request.app.state.vllm_config))
            facts.update(family=converted.family, rank=converted.rank, params=converted.params, bytes=converted.nbytes)
        except Exception as e:  # a listing never fails because one adapter went bad on disk
            facts["error"] = str(e)
        return facts

    @router.get("/v1/adapters")
    async def list_adapters(request: Request):
        return {"adapters": [await describe(request, lora) for lora in models(request).lora_requests.values()]}

    @router.post("/v1/adapters")
    async def load(request: Request, body: LoadAdapter):
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        try:
            path = resolve_runtime_path(settings, body.name, body.path)
        except InvalidAdapterName as e:
            return error(HTTPStatus.BAD_REQUEST, str(e))
        except PermissionError as e:
            return error(HTTPStatus.BAD_REQUEST, str(e))
        if body.name in models(request).lora_requests:
            return error(HTTPStatus.CONFLICT, f"adapter {body.name!r} is already loaded; unload it first")
        result = await models(request).load_lora_adapter(LoadLoRAAdapterRequest(lora_name=body.name,
                                                                                  lora_path=str(path)))
        if not isinstance(result, str):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        return await describe(request, models(request).lora_requests[body.name])

    @router.delete("/v1/adapters/{name}")
    async def unload(request: Request, name: str):
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        if name not in models(request).lora_requests:
            return error(HTTPStatus.NOT_FOUND, f"adapter {name!r} is not loaded")
        result = await models(request).unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if not isinstance(result, str):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        return {"unloaded": name}

    @router.get("/v1/models")
    async def list_models(request: Request):
        listing = (await models(request).show_available_models()).model_dump()
        by_name = models(request).lora_requests
        for card in listing["data"]:
            if card["id"] in by_name:
                card["adapter"] = await describe(request, by_name[card["id"]])
        return listing

    app.include_router(router)
    # our /v1/models must win over vLLM's, which was registered first
    ours = [r for r in app.router.routes if getattr(r, "path", None) == "/v1/models" and r.endpoint is list_models]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]

    async def guard(request: Request, call_next):
        path = request.url.path
        is_admin = path.startswith(ADMIN_PATHS)
        if settings.api_key and (is_admin or settings.protect_all) and path.startswith("/v1"):
            supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(supplied.encode(), settings.api_key.encode()):
                return error(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")
        if path == "/v1/load_lora_adapter" and request.method == "POST":
            try:
                body = await request.json()
                resolve_runtime_path(settings, str(body.get("lora_name", "")), body.get("lora_path"))
            except (InvalidAdapterName, PermissionError) as e:
                return error(HTTPStatus.BAD_REQUEST, str(e))
            except ValueError:
                return error(HTTPStatus.BAD_REQUEST, "malformed JSON body")
        return await call_next(request)

    # vLLM's app has already built its middleware stack: add ours outermost and let Starlette rebuild it lazily
    app.user_middleware.insert(0, Middleware(BaseHTTPMiddleware, dispatch=guard))
    app.middleware_stack = None
