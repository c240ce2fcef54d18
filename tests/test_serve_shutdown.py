"""Ending a server under traffic: SIGTERM drains (in-flight HTTP and gRPC streams finish, both servers stop, the process
exits 0); an engine core killed mid-stream ends every stream with an explicit error, never a bare cut."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

pytest.importorskip("vllm", reason="tenfold serve runs vLLM (the cpu extra)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (test extra)")

from serve_process import free_port, tenfold_server  # noqa: E402


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_drains_and_stops(tiny_model_dirs, tmp_path):
    import grpc

    from tenfold.server.grpc import load_protos

    pb, services = load_protos()
    grpc_port = free_port()
    with tenfold_server(tiny_model_dirs["gqa"], tmp_path / "serve.log", "--grpc-port", grpc_port) as running:
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused", max_retries=0, timeout=120)
        results = {}
        started = {"http": threading.Event(), "grpc": threading.Event()}

        def consume(stream, name):
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                started[name].set()
            return chunks

        def http_stream():
            try:
                chunks = consume(client.completions.create(model="base", prompt="The train leaves", max_tokens=120,
                                                           stream=True, extra_body={"ignore_eos": True}), "http")
                results["http"] = ("finished", chunks[-1].choices[0].finish_reason if chunks[-1].choices else None)
            except (openai.APIConnectionError, openai.APIError) as e:
                results["http"] = ("ended", type(e).__name__)

        def grpc_stream():
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            stub = services.TenfoldStub(channel)
            try:
                chunks = consume(stub.GenerateStream(pb.GenerateRequest(
                    text="The river", sampling=pb.SamplingParameters(max_tokens=120, ignore_eos=True)), timeout=120),
                    "grpc")
                results["grpc"] = ("finished", chunks[-1].finish_reason)
            except grpc.RpcError as e:
                results["grpc"] = ("ended", e.code().name)
            finally:
                channel.close()

        threads = [threading.Thread(target=http_stream), threading.Thread(target=grpc_stream)]
        for t in threads:
            t.start()
        for name, event in started.items():  # a fixed sleep raced slow machines: signal once both are generating
            assert event.wait(timeout=120), f"the {name} stream produced no token: {results}"
        running["process"].send_signal(signal.SIGTERM)
        exit_code = running["process"].wait(timeout=120)
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a client hung after the server stopped"
        assert exit_code == 0
        assert not port_open(running["port"]) and not port_open(grpc_port)
        assert results == {"http": ("finished", "length"), "grpc": ("finished", "length")}


def sse_events(client, url: str, body: dict, started: threading.Event) -> list:
    """The parsed `data:` events of one streamed request, `[DONE]` as the string; a cut shows as the transport error
    the client raises (an incomplete chunked body)."""
    import json

    events = []
    with client.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


def engine_core_of(server_pid: int):
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("the server has no engine core process")


def test_engine_death_ends_every_stream_with_an_error(tiny_model_dirs, tmp_path):
    """SIGKILL the engine core under 3 SSE streams (completions, chat) and 3 gRPC calls (streams and a unary call):
    each SSE stream ends with an error event in OpenAI's shape and [DONE] (vLLM's stream generators do this on
    EngineDeadError), each gRPC call with UNAVAILABLE, and the server then exits."""
    import grpc
    import httpx

    from tenfold.server.grpc import load_protos

    pb, services = load_protos()
    grpc_port = free_port()
    with tenfold_server(tiny_model_dirs["gqa"], tmp_path / "serve.log", "--grpc-port", grpc_port) as running:
        http = httpx.Client(base_url=running["url"])
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = services.TenfoldStub(channel)
        long = {"max_tokens": 200, "ignore_eos": True}
        calls = {
            "completions 1": lambda e: sse_events(http, "/v1/completions", {"model": "base", "prompt": "The train",
                                                                             "stream": True, **long}, e),
            "completions 2": lambda e: sse_events(http, "/v1/completions", {"model": "base", "prompt": [5, 6, 7],
                                                                             "stream": True, **long}, e),
            "chat": lambda e: sse_events(http, "/v1/chat/completions", {
                "model": "base", "messages": [{"role": "user", "content": "Hello"}], "stream": True, **long}, e),
            "grpc stream 1": lambda e: [e.set() or c for c in stub.GenerateStream(pb.GenerateRequest(
                text="The river", sampling=pb.SamplingParameters(max_tokens=200, ignore_eos=True)), timeout=120)],
            "grpc stream 2": lambda e: [e.set() or c for c in stub.GenerateStream(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[9, 8, 7]), sampling=pb.SamplingParameters(max_tokens=200, ignore_eos=True)),
                timeout=120)],
            "grpc unary": lambda e: stub.Generate(pb.GenerateRequest(
                text="A long", sampling=pb.SamplingParameters(max_tokens=200, ignore_eos=True)), timeout=120),
        }
        started = {name: threading.Event() for name in calls}
        started["grpc unary"].set()  # it answers once, at the end
        results = {}

        def run(name):
            try:
                results[name] = ("returned", calls[name](started[name]))
            except grpc.RpcError as e:
                results[name] = ("grpc", e.code(), e.details())
            except Exception as e:  # a cut (httpx.RemoteProtocolError) or anything else: the assertions name it
                results[name] = ("raised", repr(e))
            finally:
                started[name].set()

        threads = [threading.Thread(target=run, args=(name,)) for name in calls]
        for t in threads:
            t.start()
        for name, event in started.items():
            assert event.wait(timeout=120), f"{name} produced nothing: {results}"
        engine = engine_core_of(running["process"].pid)
        engine.suspend()  # mid-stream from here on (a stream finishing before this point counts as finished)
        engine.kill()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive(), f"a client hung after the engine died: {results}"
        channel.close()
        http.close()
        errors = {"sse": 0, "grpc": 0}
        for name in ("completions 1", "completions 2", "chat"):
            kind, events = results[name]
            assert kind == "returned" and events[-1] == "[DONE]", (name, results[name])  # no cut
            if "error" in events[-2]:
                error = events[-2]["error"]
                assert error["code"] >= 500 and error["message"] and error["type"], (name, error)
                assert "Traceback" not in error["message"]
                errors["sse"] += 1
            else:
                assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in events[:-1]), name
        for name in ("grpc stream 1", "grpc stream 2", "grpc unary"):
            if results[name][0] == "grpc":
                assert results[name][1] == grpc.StatusCode.UNAVAILABLE, (name, results[name])
                assert "Traceback" not in results[name][2]
                errors["grpc"] += 1
            else:
                assert results[name][0] == "returned", (name, results[name])
        assert errors["sse"] and errors["grpc"], f"every call finished before the kill: {results}"
        running["process"].wait(timeout=120)  # raises when the server keeps running without its engine
