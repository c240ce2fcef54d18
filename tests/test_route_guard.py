"""Deny by default over HTTP, without an engine: the app `tenfold serve` builds (vLLM's build_app on the parsed
arguments, then tenfold's routes and guard), walked route by route and method by method. Every route is open by the
lists of tenfold/server/access.py or answers 401 without the key, so a route a future vLLM adds cannot slip through;
the guard decides on the routed path (--root-path stripped)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm", reason="the app is vLLM's OpenAI app (the cpu extra)")

from starlette.routing import Mount, Route, WebSocketRoute  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tenfold.cli import build_parser  # noqa: E402
from tenfold.server import access  # noqa: E402

KEY = "guard-key-" + "7f3a"
ADMIN = {"Authorization": f"Bearer {KEY}"}


def every_task():
    """Every task vLLM mounts routes for, with a model config that asks for its pooling routes too, so that the walk
    covers routes a generation model does not have (a future vLLM may mount them for it)."""
    import types

    from vllm.tasks import FRONTEND_TASKS, GENERATION_TASKS, POOLING_TASKS

    config = types.SimpleNamespace(get_pooling_task=lambda tasks: "embed", io_processor_plugin=None,
                                   hf_config=types.SimpleNamespace(num_labels=1), architecture="LlamaForCausalLM")
    return GENERATION_TASKS + POOLING_TASKS + FRONTEND_TASKS, config


def serve_app(tiny_model_dirs, monkeypatch, *flags, tasks=("generate",), model_config=None, dev_mode=False):
    """The HTTP app of `tenfold serve MODEL --api-key KEY *flags`, with no engine behind it."""
    from vllm.entrypoints.launchers.app import build_app

    from tenfold.server.adapter_admin import AdapterAdmin
    from tenfold.server.admin_routes import install
    from tenfold.server.serve import serve_settings, vllm_serve_args

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # as `tenfold serve` sets it
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1" if dev_mode else "0")
    args, passthrough = build_parser().parse_known_args(
        ["serve", str(tiny_model_dirs["mha"]), "--api-key", KEY, *flags])
    app = build_app(vllm_serve_args(args, passthrough), tasks, model_config)
    install(app, AdapterAdmin(app.state, serve_settings(args), facts_of=lambda path: None))
    return app


def concrete(route) -> list[tuple[str, str]]:
    """(method, path) for every method of a route, its path parameters filled in."""
    if isinstance(route, Mount):
        return [(m, p) for p in (route.path, route.path + "/x") for m in ("GET", "POST", "DELETE")]
    path = re.sub(r"{[^}:]+:int}", "1", route.path)
    path = re.sub(r"{[^}]+}", "x", path)
    if isinstance(route, WebSocketRoute):
        return [("WEBSOCKET", path)]
    assert isinstance(route, Route), f"a route the walk does not know how to call: {route!r}"
    return [(m, path) for m in sorted(route.methods)]


def call(client, method, path, headers=None):
    if method == "WEBSOCKET":
        from starlette.websockets import WebSocketDisconnect

        try:
            with client.websocket_connect(path, headers=dict(headers or {})):
                return 101
        except WebSocketDisconnect as e:
            return 401 if e.code == 1008 else e.code
    return client.request(method, path, headers=headers).status_code


def is_open(path: str, protect_all: bool) -> bool:
    return path in access.HEALTH or (not protect_all and path in access.SERVING)


@pytest.mark.parametrize("protect_all", [False, True], ids=["serving-open", "protect-all"])
@pytest.mark.parametrize("dev_mode", [False, True], ids=["", "dev-routes"])
def test_every_route_is_open_by_the_list_or_needs_the_key(tiny_model_dirs, monkeypatch, protect_all, dev_mode):
    tasks, model_config = every_task()
    app = serve_app(tiny_model_dirs, monkeypatch, *(["--protect-all"] if protect_all else []), tasks=tasks,
                    model_config=model_config, dev_mode=dev_mode)
    client = TestClient(app, raise_server_exceptions=False)
    walked, wrong = 0, []
    for route in app.routes:
        for method, path in concrete(route):
            walked += 1
            status = call(client, method, path)
            if (status == 401) == is_open(path, protect_all):
                wrong.append(f"{method} {path}: {status} without the key")
            if not is_open(path, protect_all) and method != "WEBSOCKET" and call(client, method, path,
                                                                                  ADMIN) == 401:
                wrong.append(f"{method} {path}: 401 with the key")
            if call(client, method, path, {"Authorization": "Bearer wrong"}) == 401 and is_open(path, protect_all):
                wrong.append(f"{method} {path}: an open route refused a wrong key")
    assert not wrong, "\n".join(wrong)
    assert walked > 40, "the walk saw too few routes"
    paths = {getattr(r, "path", None) for r in app.routes}
    assert set(access.HEALTH) | set(access.SERVING) <= paths, "the open lists name routes the app does not have"
    if dev_mode:
        assert {"/collective_rpc", "/sleep", "/reset_prefix_cache", "/server_info"} <= paths


def test_sagemaker_adapter_and_invocation_routes_are_not_mounted(tiny_model_dirs, monkeypatch):
    """vLLM's /adapters loads any path, outside --adapter-root; /invocations is a second door to generation."""
    app = serve_app(tiny_model_dirs, monkeypatch)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert not {"/adapters", "/adapters/{adapter_name}", "/invocations"} & paths
    assert {"/ping", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters"} <= paths
    client = TestClient(app, raise_server_exceptions=False)
    assert client.delete("/adapters/good").status_code == 401
    assert client.delete("/adapters/good", headers=ADMIN).status_code == 404
    assert client.post("/invocations", json={"prompt": "x"}, headers=ADMIN).status_code == 404


@pytest.mark.parametrize("root_path", ["/api", "/api/v2"])
def test_the_guard_decides_on_the_routed_path(tiny_model_dirs, monkeypatch, root_path):
    """With --root-path the router strips the prefix: /api/v1/adapters is /v1/adapters and needs the key."""
    app = serve_app(tiny_model_dirs, monkeypatch, "--root-path", root_path)
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/v1/adapters", "/v1/adapters/x/pin", "/version", "/docs"):
        for prefix in ("", root_path):
            assert client.get(prefix + path).status_code == 401, prefix + path
            assert client.get(prefix + path, headers=ADMIN).status_code != 401, prefix + path
    for path in ("/v1/models", "/health"):  # open, under either spelling
        assert client.get(root_path + path).status_code != 401, root_path + path
    # a path that only looks open after a prefix the router does not strip stays closed
    assert client.get(root_path + "x/v1/models").status_code == 401
    assert client.get("/health/").status_code == 401


def test_cors_preflight_passes_and_plain_options_does_not(tiny_model_dirs, monkeypatch):
    app = serve_app(tiny_model_dirs, monkeypatch, "--allowed-origins", '["https://app.example"]')
    client = TestClient(app, raise_server_exceptions=False)
    preflight = client.options("/v1/adapters", headers={"Origin": "https://app.example",
                                                       "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert client.options("/v1/adapters").status_code == 401


def test_the_key_counts_only_as_a_bearer_credential(tiny_model_dirs, monkeypatch):
    client = TestClient(serve_app(tiny_model_dirs, monkeypatch), raise_server_exceptions=False)
    for authorization in (KEY, f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", "Bearer", ""):
        assert client.get("/version", headers={"Authorization": authorization}).status_code == 401, authorization
    for authorization in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "):
        assert client.get("/version", headers={"Authorization": authorization}).status_code == 200, authorization


def test_refusal_is_openai_shaped(tiny_model_dirs, monkeypatch):
    client = TestClient(serve_app(tiny_model_dirs, monkeypatch), raise_server_exceptions=False)
    refused = client.post("/v1/unload_lora_adapter", json={"lora_name": "x"},
                          headers={"Authorization": f"Bearer {KEY}x"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == 401 and "API key" in refused.json()["error"]["message"]


def test_vllm_http_tls_flags_reach_the_http_server(tiny_model_dirs, tmp_path):
    """`tenfold serve` runs its own uvicorn (beside gRPC): vLLM's --ssl-* flags must reach it, not be parsed and
    dropped."""
    from tenfold.server.serve import http_transport, vllm_serve_args

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args, passthrough = build_parser().parse_known_args(
        ["serve", str(tiny_model_dirs["mha"]), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
         "--ssl-cert-reqs", "2"])
    options = http_transport(vllm_serve_args(args, passthrough))
    assert (options["ssl_certfile"], options["ssl_keyfile"], options["ssl_cert_reqs"]) == (str(cert), str(key), 2)
