"""tenfold's gRPC server in-process, on stand-in engines: TLS (a certificate made here, a plaintext client refused),
the key rule per method, listings without server paths, and failures that end the call with a status: a dead
engine UNAVAILABLE, anything unexpected INTERNAL without its message or traceback."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import types
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the servicer builds vLLM SamplingParams")
grpc = pytest.importorskip("grpc")
x509 = pytest.importorskip("cryptography.x509", reason="the TLS test makes its certificate (test extra)")

from serve_process import free_port  # noqa: E402
from tenfold.server.adapter_admin import ServeSettings  # noqa: E402
from tenfold.server.grpc.servicer import pb, services, start  # noqa: E402
from tenfold.server.serve import grpc_tls  # noqa: E402

KEY = "grpc-key-" + "51c0"
AUTH = (("authorization", f"Bearer {KEY}"),)
SECRET_PATH = "/srv/tenant-a/adapters/secret"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A fresh key and a certificate for localhost / 127.0.0.1, as PEM files."""
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Engine:
    """Yields `tokens` cumulative outputs, then raises `fail` (if any) instead of finishing."""

    def __init__(self, tokens: list[int], fail: BaseException | None = None):
        self.tokens, self.fail = tokens, fail
        self.aborted = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        for i in range(1, len(self.tokens) + 1):
            finished = i == len(self.tokens) and self.fail is None
            completion = types.SimpleNamespace(text="", token_ids=self.tokens[:i],
                                               finish_reason="length" if finished else None)
            yield types.SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2], finished=finished)
            await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail

    async def abort(self, request_id):
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(self.fail, EngineDeadError):
            raise EngineDeadError()  # what a dead engine's client may do
        self.aborted.append(request_id)


def admin_on(engine, protect_all=False):
    async def lora_request(name):
        return None

    async def listing(with_paths):
        card = {"name": "tenant-a", "family": "lora", "rank": 4, "residency": "registered", "pinned": False}
        return [{**card, "path": SECRET_PATH} if with_paths else card]

    return types.SimpleNamespace(settings=ServeSettings(api_key=KEY, protect_all=protect_all, adapter_root=None),
                                 state=types.SimpleNamespace(engine_client=engine), lora_request=lora_request,
                                 list=listing)


def run_against(engine, calls, tls=None, protect_all=False, credentials=None):
    """Starts the server on `engine`, runs `calls(stub, channel)` over a channel (TLS with `credentials`), stops it."""
    async def scenario():
        port = free_port()
        server = await start(admin_on(engine, protect_all), "127.0.0.1", port, tls)
        target = f"127.0.0.1:{port}"
        channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                   else grpc.aio.insecure_channel(target))
        try:
            return await calls(services.TenfoldStub(channel), channel)
        finally:
            await channel.close()
            await server.stop(None)

    return asyncio.run(scenario())


def request(n=3):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParameters(max_tokens=n))


async def outcome(call):
    """The call's reply, or (status code, details) when it failed."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()


def test_tls_serves_a_secure_client_and_refuses_a_plaintext_one(tmp_path):
    import random

    cert, key = self_signed(tmp_path)
    tls = grpc_tls(argparse.Namespace(grpc_tls_cert=cert, grpc_tls_key=key))
    tokens = random.Random().sample(range(100, 1000), 5)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

    async def secure(stub, channel):
        reply = await stub.Generate(request(), timeout=30)
        chunks = [list(c.token_ids) async for c in stub.GenerateStream(request(), timeout=30)]
        return list(reply.token_ids), [t for c in chunks for t in c]

    assert run_against(Engine(tokens), secure, tls=tls, credentials=credentials) == (tokens, tokens)

    async def plaintext(stub, channel):
        return await outcome(stub.Generate(request(), timeout=10))

    code, _ = run_against(Engine(tokens), plaintext, tls=tls)
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("flags, message", [
    ({"grpc_tls_cert": "cert"}, "go together"),
    ({"grpc_tls_key": "key"}, "go together"),
    ({"grpc_tls_cert": "missing", "grpc_tls_key": "key"}, "No such file"),
    ({"grpc_tls_cert": "garbage", "grpc_tls_key": "key"}, "not a PEM certificate chain and its private key"),
    ({"grpc_tls_cert": "cert", "grpc_tls_key": "other_key"}, "not a PEM certificate chain and its private key"),
])
def test_tls_flags_are_checked_at_start(tmp_path, flags, message):
    cert, key = self_signed(tmp_path)
    (tmp_path / "garbage").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    other = tmp_path / "other"
    other.mkdir()
    files = {"cert": cert, "key": key, "missing": tmp_path / "missing.pem", "garbage": tmp_path / "garbage",
             "other_key": self_signed(other)[1]}
    args = argparse.Namespace(**{"grpc_tls_cert": None, "grpc_tls_key": None,
                                 **{flag: files[name] for flag, name in flags.items()}})
    with pytest.raises(SystemExit) as info:
        grpc_tls(args)
    assert message in str(info.value) and "tenfold serve: --grpc-tls" in str(info.value)


@pytest.mark.parametrize("protect_all", [False, True])
def test_the_key_rule_per_method(protect_all):
    async def calls(stub, channel):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        return {
            "Generate": await outcome(stub.Generate(request(), timeout=30)),
            "ListAdapters": await outcome(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)),
            "LoadAdapter": await outcome(stub.LoadAdapter(pb.LoadAdapterRequest(name="x"), timeout=30)),
            "UnloadAdapter": await outcome(stub.UnloadAdapter(pb.UnloadAdapterRequest(name="x"), timeout=30)),
            "PinAdapter": await outcome(stub.PinAdapter(pb.PinAdapterRequest(name="x"), timeout=30)),
            "UnpinAdapter": await outcome(stub.UnpinAdapter(pb.PinAdapterRequest(name="x"), timeout=30)),
            "Health": await outcome(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)),
            "Generate with the key": await outcome(stub.Generate(request(), metadata=AUTH, timeout=30)),
        }

    answers = run_against(Engine([11, 12, 13]), calls, protect_all=protect_all)
    refused = {name for name, answer in answers.items()
               if isinstance(answer, tuple) and answer[0] == grpc.StatusCode.UNAUTHENTICATED}
    admin = {"LoadAdapter", "UnloadAdapter", "PinAdapter", "UnpinAdapter"}
    assert refused == (admin | {"Generate", "ListAdapters"} if protect_all else admin), answers
    assert list(answers["Generate with the key"].token_ids) == [11, 12, 13]


def test_listing_shows_server_paths_only_with_the_key():
    async def calls(stub, channel):
        anonymous = await stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
        keyed = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=AUTH, timeout=30)
        return anonymous, keyed

    anonymous, keyed = run_against(Engine([1]), calls)
    assert [a.name for a in anonymous.adapters] == ["tenant-a"] and SECRET_PATH not in str(anonymous)
    assert [a.path for a in keyed.adapters] == [SECRET_PATH]


@pytest.mark.parametrize("failure, code", [("dead", grpc.StatusCode.UNAVAILABLE),
                                           ("unexpected", grpc.StatusCode.INTERNAL)])
def test_a_failing_engine_ends_every_call_with_a_status(failure, code):
    from vllm.v1.engine.exceptions import EngineDeadError

    fail = EngineDeadError() if failure == "dead" else RuntimeError(f"worker state at {SECRET_PATH}")

    async def calls(stub, channel):
        received, ending = [], None
        try:
            async for chunk in stub.GenerateStream(request(), metadata=AUTH, timeout=30):
                received.extend(chunk.token_ids)
        except grpc.aio.AioRpcError as e:
            ending = (e.code(), e.details())
        return received, ending, await outcome(stub.Generate(request(), metadata=AUTH, timeout=30))

    received, (stream_code, stream_details), (unary_code, unary_details) = run_against(Engine([21, 22], fail), calls)
    assert received == [21, 22], "the tokens before the failure reached the client"
    assert stream_code == unary_code == code
    for details in (stream_details, unary_details):
        assert SECRET_PATH not in details and "Traceback" not in details
    if failure == "dead":
        assert "engine stopped" in stream_details
