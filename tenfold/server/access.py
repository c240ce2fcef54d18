"""Who may call what, over HTTP and gRPC: with --api-key, every route needs the key except the ones named here.

Deny by default: a route is open only if its routed path (the app's --root-path stripped, as the router strips it;
gRPC: its method) is listed below, so a route a future vLLM adds, or one tenfold forgot, needs the key. `HEALTH` is
open always, `SERVING` unless --protect-all. Everything else (adapter admin, vLLM's own admin and utility routes,
docs) is admin: it needs the key whenever one is set. Without --api-key every route is open.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette._utils import get_route_path  # the router's own: the guard decides on the path that is routed
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .api_key import bearer_key_matches

HEALTH = {
    "/health": "liveness for load balancers and orchestrators: says only whether the engine is up",
    "/ping": "SageMaker's liveness probe (GET and POST): the same answer as /health",
}
SERVING = {
    "/v1/models": "OpenAI clients list models before use; adapter cards show no server path without the key",
    "/v1/completions": "generation (OpenAI completions)",
    "/v1/chat/completions": "generation (OpenAI chat completions)",
    "/tokenize": "the served model's tokenizer: no state, no adapter",
    "/detokenize": "the served model's tokenizer: no state, no adapter",
    "/metrics": "Prometheus scrapes without credentials by default; shows adapter names and traffic counts, which are "
                "public when generation is (with --protect-all a scraper sends the key: Prometheus' `authorization`)",
}

# gRPC methods, by the same rule: health always open, serving open unless --protect-all, every other method admin
GRPC_HEALTH = {
    "/grpc.health.v1.Health/Check": "the standard liveness check",
    "/grpc.health.v1.Health/Watch": "the standard liveness check, streamed",
}
GRPC_SERVING = {
    "/tenfold.v1.Tenfold/Generate": "generation",
    "/tenfold.v1.Tenfold/GenerateStream": "generation, streamed",
    "/tenfold.v1.Tenfold/ListAdapters": "the adapter listing (like /v1/models: no server path without the key)",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "describes tenfold.proto, which is public",
}


def error(status: HTTPStatus, message: str, headers: dict | None = None) -> JSONResponse:
    """tenfold's HTTP errors, in OpenAI's error shape."""
    return JSONResponse({"error": {"message": message, "type": status.phrase, "code": status.value}},
                        status_code=status.value, headers=headers)


def is_open(route_path: str, protect_all: bool) -> bool:
    """Whether a caller without the key may use this routed path (when a key is set)."""
    return route_path in HEALTH or (not protect_all and route_path in SERVING)


def grpc_method_is_open(method: str, protect_all: bool) -> bool:
    """Whether a gRPC caller without the key may call this method (`/package.Service/Method`, when a key is set)."""
    return method in GRPC_HEALTH or (not protect_all and method in GRPC_SERVING)


def is_admin(authorization: str | None, api_key: str | None) -> bool:
    """Whether the caller may do and see everything: it presented the key, or the server has none."""
    return not api_key or bearer_key_matches(authorization, api_key)


def _cors_preflight(scope, headers: Headers) -> bool:
    """Browsers send CORS preflights without credentials (Fetch spec); vLLM's CORS middleware answers them itself."""
    return (scope["type"] == "http" and scope["method"] == "OPTIONS" and "origin" in headers
            and "access-control-request-method" in headers)


class AccessGuard:
    """ASGI middleware, outermost: refuses a request that needs the key and lacks it before anything else runs."""

    def __init__(self, app, api_key: str | None, protect_all: bool):
        self.app = app
        self.api_key = api_key
        self.protect_all = protect_all

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            if not (is_open(get_route_path(scope), self.protect_all) or _cors_preflight(scope, headers)
                    or bearer_key_matches(headers.get("authorization"), self.api_key)):
                return await _refuse(scope, receive, send)
        await self.app(scope, receive, send)


async def _refuse(scope, receive, send) -> None:
    if scope["type"] == "websocket":  # closing before accepting refuses the handshake
        await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
        return
    await error(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)",
                {"WWW-Authenticate": "Bearer"})(scope, receive, send)
