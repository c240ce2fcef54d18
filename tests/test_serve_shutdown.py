"""SIGTERM: in-flight HTTP and gRPC streams finish (the engine drains them), both servers stop, the process exits 0."""

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
