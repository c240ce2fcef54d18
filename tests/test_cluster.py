"""`tenfold serve --replicas 2 --api-key K --protect-all` on Ray Serve (a local Ray, 2 replicas of the tiny model with
half a CPU each): tokens through the ingress (HTTP and gRPC) equal the reference for base and several families,
gRPC's admin calls and errors are the single engine's, repeated requests for an adapter land on the replica that
holds it, a pin reaches every replica and survives eviction pressure, each engine's residency metrics follow, a
replica that cannot load an adapter answers the single engine's error; one replica's server killed under 24 streams
ends each stream exactly or with an error event (gRPC: UNAVAILABLE; never a cut), its engine processes stop by
themselves, and stopping the cluster leaves no engine running. Without the cluster: every ingress route is behind
the key unless public, and the ingress's stream framing."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

pytest.importorskip("vllm", reason="the replicas run vLLM (the cpu extra)")
pytest.importorskip("ray.serve", reason="tenfold serve --replicas runs on Ray Serve (the ray extra)")
openai = pytest.importorskip("openai", reason="the cluster tests use the official openai client (test extra)")

import httpx  # noqa: E402

from adapter_cases import make  # noqa: E402
from serve_process import ENGINE_ARGS, free_port, running_server, wait_gone  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

KEY = "cluster-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
AUTH = (("authorization", f"Bearer {KEY}"),)  # gRPC metadata
CASES = {"heads": "lorta_heads_out", "blocks": "miss", "weighted": "bat", "train": "loretta_rep"}
STREAMS, GRPC_STREAMS, STREAM_TOKENS = 24, 4, 32
ENGINE_EXIT_SECONDS = 120  # bounds a failure only: the guard stops an orphan in about 30 s
CLUSTER_STOP_SECONDS = 300


def test_an_evicted_adapter_is_unloaded_once_and_collected_without_a_stray_coroutine():
    """Serve's multiplexer awaits a model's `__del__` on eviction (ray.serve.multiplex); the garbage collector later
    calls the class's `__del__`, which must not create a coroutine that is never awaited."""
    import asyncio
    import gc
    import inspect
    import warnings

    from tenfold.cluster.replica import ResidentAdapter

    class Replica:
        unloaded: list[str] = []

        async def unload_evicted(self, name: str) -> None:
            self.unloaded.append(name)

    replica = Replica()

    async def evict():  # what ray.serve.multiplex does with an evicted model
        model = ResidentAdapter(replica, "z0")
        assert hasattr(model, "__del__") and inspect.iscoroutinefunction(model.__del__)
        await model.__del__()
        model.__del__ = lambda _: None

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        asyncio.run(evict())
        gc.collect()
    assert replica.unloaded == ["z0"]
    assert not [str(w.message) for w in seen if "never awaited" in str(w.message)]


@pytest.mark.parametrize("protect_all", [False, True])
def test_every_ingress_route_needs_the_key_unless_public(protect_all):
    """Deny by default: every route the ingress app has (and one it has not) answers 401 without the key or with a
    wrong one, except health and, without --protect-all, generation and the model list."""
    from starlette.testclient import TestClient

    from tenfold.cluster.ingress import ingress_class

    app = ingress_class(KEY, protect_all, True, "unused-registry").http_app
    public = {"/health"} | (set() if protect_all else {"/v1/completions", "/v1/chat/completions", "/v1/models"})
    routes = [(method, route.path) for route in app.routes for method in route.methods - {"HEAD"}]
    assert len(routes) > 10
    client = TestClient(app, raise_server_exceptions=False)  # handlers fail here (no Serve): only the key matters
    for method, path in [*routes, ("GET", "/v1/no-such-route"), ("DELETE", "/adapters/x"), ("POST", "/invocations")]:
        url = path.replace("{name}", "some-adapter")
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            status = client.request(method, url, headers=headers).status_code
            assert (status == 401) == (path not in public), (method, path, headers, status)
        assert client.request(method, url, headers=ADMIN).status_code != 401, (method, path)


def test_a_stream_that_breaks_or_ends_early_ends_with_an_error_event():
    """The ingress passes an engine's events on whole; a stream that raises mid-event or ends without the engine's
    [DONE] ends with one error event in OpenAI's shape and [DONE], never a cut or a partial event."""
    import asyncio
    import random

    from tenfold.cluster.ingress import whole_events_or_error

    rng = random.Random(480)
    events = [b"data: " + json.dumps({"choices": [{"text": "%08x" % rng.getrandbits(32)}]}).encode() + b"\n\n"
              for _ in range(rng.randint(3, 8))]

    def pieces(blob: bytes) -> list[bytes]:
        cuts = sorted(rng.sample(range(1, len(blob)), 6))
        return [blob[i:j] for i, j in zip([0, *cuts], [*cuts, len(blob)])]

    def through_ingress(parts: list[bytes], error: Exception | None) -> bytes:
        async def engine():
            for part in parts:
                yield part
            if error is not None:
                raise error

        async def collect():
            return b"".join([chunk async for chunk in whole_events_or_error(engine())])

        return asyncio.run(collect())

    done = b"data: [DONE]\n\n"
    finished = b"".join(events) + done
    assert through_ingress(pieces(finished), None) == finished
    for parts, error in [(pieces(b"".join(events) + events[0][:9]), ConnectionError("peer closed")),
                         (pieces(b"".join(events)), None)]:
        out = through_ingress(parts, error)
        assert out.startswith(b"".join(events)) and out.endswith(done), out
        tail = out[len(b"".join(events)):-len(done)]
        assert tail.startswith(b"data: ") and tail.endswith(b"\n\n") and tail.count(b"\n\n") == 1, tail
        failure = json.loads(tail.removeprefix(b"data: "))["error"]
        assert failure["code"] == 503 and failure["type"] == "ServiceUnavailableError" and failure["message"]


@pytest.fixture(scope="module")
def cluster(tiny_model_dirs, specs, tmp_path_factory):
    spec = specs["mha"]
    root = tmp_path_factory.mktemp("cluster-root")
    adapters = {name: make(case, spec, seed=400 + i) for i, (name, case) in enumerate(CASES.items())}
    for i in range(6):
        adapters[f"z{i}"] = make("lora", spec, seed=420 + i)
    for name, adapter in adapters.items():
        save_adapter(adapter, root / name)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")
    logs = tmp_path_factory.mktemp("cluster-logs")
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "tenfold.cli", "serve", tiny_model_dirs["mha"], "--replicas", 2,
            "--replica-cpus", 0.5, "--port", port, "--grpc-port", grpc_port, "--adapter-root", root, "--api-key", KEY,
            "--protect-all", "--replica-log-dir", logs, *ENGINE_ARGS, "--max-cpu-loras", 4, "--max-loras", 2]
    with running_server(argv, port, logs / "cluster.log", startup_timeout=600) as running:
        deadline = time.monotonic() + 600  # the ingress answers before every replica has started
        while len(httpx.get(f"{running['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]) < 2:
            assert time.monotonic() < deadline, "the replicas did not start"
            time.sleep(2)
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key=KEY, max_retries=0, timeout=180)
        yield {**running, "client": client, "adapters": adapters, "root": root, "grpc": f"127.0.0.1:{grpc_port}"}


def generate(cluster, model, prompt, n=12):
    """Greedy token ids and the serving replica's headers, through the ingress."""
    response = cluster["client"].completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=n, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    tokens = [int(t.removeprefix("token_id:")) for t in response.parse().choices[0].logprobs.tokens]
    return tokens, response.headers.get("x-tenfold-replica"), response.headers.get("x-tenfold-adapter-loaded")


def replica_metrics(cluster) -> dict[str, dict]:
    from prometheus_client.parser import text_string_to_metric_families

    urls = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
    scraped = {}
    for replica_id, url in urls.items():
        samples = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=ADMIN, timeout=30).text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        scraped[replica_id] = samples
    return scraped


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("model", ["base", *CASES])
def test_tokens_through_the_ingress_match_the_reference(cluster, model, hf_models):
    prompt = random_prompts(1, seed=440 + len(model))[0]
    expected = greedy_reference(hf_models["mha"], prompt, 12, cluster["adapters"].get(model))[0]
    tokens, replica, _ = generate(cluster, model, prompt)
    assert tokens == expected and replica


def test_streaming_and_chat_through_the_ingress(cluster):
    client = cluster["client"]
    stream = client.completions.create(model="heads", prompt="The river runs", max_tokens=8, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    plain = client.completions.create(model="heads", prompt="The river runs", max_tokens=8, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert len(pieces) >= 2 and "".join(pieces) == plain.choices[0].text
    chat = client.chat.completions.create(model="blocks", max_tokens=6, temperature=0.0,
                                          messages=[{"role": "user", "content": "Hello there"}])
    assert chat.usage.completion_tokens > 0
    models = {m.id for m in client.models.list().data}
    assert "base" in models


@pytest.fixture(scope="module")
def stub(cluster):
    import grpc

    from tenfold.server.grpc import load_protos

    pb, services = load_protos()
    channel = grpc.insecure_channel(cluster["grpc"])
    yield pb, services.TenfoldStub(channel)
    channel.close()


def test_grpc_through_the_ingress_matches_the_reference(cluster, stub, hf_models):
    pb, client = stub
    prompt = random_prompts(1, seed=445)[0]
    request = pb.GenerateRequest(adapter="weighted", token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParameters(max_tokens=12, temperature=0.0, ignore_eos=True))
    reply, call = client.Generate.with_call(request, metadata=AUTH, timeout=180)
    expected = greedy_reference(hf_models["mha"], prompt, 12, cluster["adapters"]["weighted"])[0]
    assert list(reply.token_ids) == expected and reply.finish_reason == "length"
    served = dict(call.trailing_metadata())
    assert served.get("x-tenfold-replica") and served.get("x-tenfold-adapter-loaded") in ("0", "1")
    chunks = list(client.GenerateStream(request, metadata=AUTH, timeout=180))
    assert len(chunks) >= 2 and [t for c in chunks for t in c.token_ids] == expected
    base = client.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=request.sampling),
                           metadata=AUTH, timeout=180)
    assert list(base.token_ids) == greedy_reference(hf_models["mha"], prompt, 12, None)[0]


def test_grpc_admin_and_errors_are_the_single_engines(stub):
    import grpc

    pb, client = stub
    auth = AUTH
    with pytest.raises(grpc.RpcError) as info:
        client.LoadAdapter(pb.LoadAdapterRequest(name="z5"), timeout=180)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    loaded = client.LoadAdapter(pb.LoadAdapterRequest(name="z5"), metadata=auth, timeout=180)
    assert loaded.name == "z5" and loaded.family == "lora"
    assert "z5" in {a.name for a in client.ListAdapters(pb.ListAdaptersRequest(), metadata=auth, timeout=60).adapters}
    for call, request in [(client.ListAdapters, pb.ListAdaptersRequest()), (client.Generate, pb.GenerateRequest(
            adapter="z5", text="x"))]:  # --protect-all: generation and listings need the key too
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for name, code in {"absent": grpc.StatusCode.NOT_FOUND, "broken": grpc.StatusCode.INVALID_ARGUMENT,
                       "../x": grpc.StatusCode.INVALID_ARGUMENT}.items():
        with pytest.raises(grpc.RpcError) as info:
            client.LoadAdapter(pb.LoadAdapterRequest(name=name), metadata=auth, timeout=180)
        assert info.value.code() == code, (name, info.value.details())
        for call in (client.Generate, lambda *args, **kwargs: list(client.GenerateStream(*args, **kwargs))):
            with pytest.raises(grpc.RpcError) as info:
                call(pb.GenerateRequest(adapter=name, text="x"), metadata=auth, timeout=180)
            assert info.value.code() == code, (name, info.value.details())
    client.UnloadAdapter(pb.UnloadAdapterRequest(name="z5"), metadata=auth, timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        client.UnloadAdapter(pb.UnloadAdapterRequest(name="z5"), metadata=auth, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.Generate(pb.GenerateRequest(adapter="heads"), metadata=auth, timeout=60)  # no prompt
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repeated_requests_stay_on_the_replica_that_holds_the_adapter(cluster):
    _, first, loaded = generate(cluster, "train", [5, 6, 7], n=2)
    time.sleep(1.0)  # a replica reports the adapters it holds every 0.1 s
    later = []
    for _ in range(5):
        _, replica, loaded_again = generate(cluster, "train", [5, 6, 7], n=2)
        later.append((replica, loaded_again))
    assert later == [(first, "0")] * 5, (first, loaded, later)


def test_errors_are_the_single_engines(cluster):
    with pytest.raises(openai.NotFoundError):
        cluster["client"].completions.create(model="absent", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        cluster["client"].completions.create(model="broken", prompt="x", max_tokens=2)
    assert httpx.get(f"{cluster['url']}/v1/adapters").status_code == 401
    unkeyed = httpx.post(f"{cluster['url']}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2},
                         timeout=60)
    assert unkeyed.status_code == 401  # --protect-all
    assert generate(cluster, "base", [5, 6, 7], n=2)[0]  # still serving


def test_pin_reaches_every_replica_and_survives_eviction_pressure(cluster):
    url = f"{cluster['url']}/v1/adapters"
    pinned = httpx.post(f"{url}/blocks/pin", headers=ADMIN, timeout=300)
    assert pinned.status_code == 200 and len(pinned.json()["replicas"]) == 2, pinned.text
    for i in range(6):  # more adapters than a replica's cache (4) holds, spread over both
        generate(cluster, f"z{i}", [7, 8, 9], n=2)
    for replica_id, samples in replica_metrics(cluster).items():
        assert value(samples, "tenfold_adapter_pinned", adapter="blocks", family="miss") == 1, replica_id
        assert value(samples, "tenfold_adapter_resident", adapter="blocks", family="miss", tier="host") == 1
        assert value(samples, "tenfold_adapter_tier_exits_total", adapter="blocks", tier="host",
                     reason="evicted") == 0
    listing = {a["name"]: a for a in httpx.get(url, headers=ADMIN, timeout=60).json()["adapters"]}
    assert all(r["pinned"] for r in listing["blocks"]["replicas"].values())
    assert httpx.delete(f"{url}/blocks/pin", headers=ADMIN, timeout=60).status_code == 200
    assert all(value(s, "tenfold_adapter_pinned", adapter="blocks", family="miss") == 0
               for s in replica_metrics(cluster).values())


def test_residency_metrics_follow_a_load_and_an_unload(cluster):
    url = f"{cluster['url']}/v1/adapters"
    loaded = httpx.post(url, json={"name": "weighted"}, headers=ADMIN, timeout=300)
    assert loaded.status_code == 200 and loaded.json()["family"] == "bat", loaded.text
    holder = loaded.headers["x-tenfold-replica"]
    assert value(replica_metrics(cluster)[holder], "tenfold_adapter_resident", adapter="weighted", family="bat",
                 tier="host") == 1
    assert httpx.delete(f"{url}/weighted", headers=ADMIN, timeout=60).status_code == 200
    samples = replica_metrics(cluster)[holder]
    assert value(samples, "tenfold_adapter_resident", adapter="weighted", family="bat", tier="host") == 0
    assert value(samples, "tenfold_adapter_tier_exits_total", adapter="weighted", tier="host", reason="unloaded") >= 1


def server_pid(engine_url: str) -> int:
    """The pid of the `tenfold serve` process listening at a replica's engine URL."""
    import psutil

    port = int(engine_url.rsplit(":", 1)[1])
    return next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN)


def stream_outcome(cluster, prompt, expected, on_token) -> str:
    """One streamed completion through the ingress: "finished" (the engine's [DONE] after exactly the expected
    tokens), "error" (an error event in OpenAI's shape, then [DONE]), "refused" (503 with Retry-After before the
    stream started), or what went wrong."""
    body = {"model": "base", "prompt": prompt, "max_tokens": len(expected), "temperature": 0.0, "stream": True,
            "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True}
    tokens, events = [], []
    try:
        with httpx.stream("POST", f"{cluster['url']}/v1/completions", json=body, headers=ADMIN,
                          timeout=300) as response:
            if response.status_code != 200:
                response.read()
                retryable = response.status_code == 503 and response.headers.get("retry-after")
                return "refused" if retryable else f"{response.status_code} {response.text[:200]}"
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if events[-1] == "[DONE]":
                    continue
                for choice in json.loads(events[-1]).get("choices", []):
                    tokens += [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
                on_token(response.headers["x-tenfold-replica"], len(tokens))
    except httpx.HTTPError as e:
        return f"cut: {e!r} after {len(events)} events"
    if events[-1:] != ["[DONE]"]:
        return f"no [DONE] after {len(events)} events"
    payloads = [json.loads(e) for e in events[:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    if errors:  # one error event, the last before [DONE], in OpenAI's shape
        shaped = len(errors) == 1 and "error" in payloads[-1] and {"message", "type", "code"} <= set(errors[0])
        return "error" if shaped else f"malformed error events {errors}"
    return "finished" if tokens == expected else f"wrong tokens {tokens} != {expected}"


def grpc_stream_outcome(stub, prompt, expected) -> str:
    """One GenerateStream through the gRPC ingress: "finished" (exactly the expected tokens, the last message with a
    finish reason), "unavailable" (ended with UNAVAILABLE), or what went wrong."""
    import grpc

    pb, client = stub
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParameters(
        max_tokens=len(expected), temperature=0.0, ignore_eos=True))
    tokens, finish = [], ""
    try:
        for message in client.GenerateStream(request, metadata=AUTH, timeout=600):
            tokens += message.token_ids
            finish = message.finish_reason
    except grpc.RpcError as e:
        return "unavailable" if e.code() == grpc.StatusCode.UNAVAILABLE else f"{e.code()} {e.details()}"
    return "finished" if tokens == expected and finish else f"ended without an error: {tokens} ({finish!r})"


def plain_outcome(cluster, prompt, expected) -> str:
    """One completion through the ingress: "finished" (exactly the expected tokens), "refused" (503 with
    Retry-After), or what went wrong."""
    body = {"model": "base", "prompt": prompt, "max_tokens": len(expected), "temperature": 0.0, "logprobs": 1,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    try:
        response = httpx.post(f"{cluster['url']}/v1/completions", headers=ADMIN, timeout=300, json=body)
    except httpx.HTTPError as e:
        return f"cut: {e!r}"
    if response.status_code != 200:
        retryable = response.status_code == 503 and response.headers.get("retry-after")
        return "refused" if retryable else f"{response.status_code} {response.text[:200]}"
    tokens = [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]
    return "finished" if tokens == expected else f"wrong tokens {tokens}"


def test_a_replica_killed_under_streams_ends_each_stream_exactly_or_with_an_error(cluster, stub, hf_models):
    """24 SSE streams, a few gRPC streams and a loop of plain requests while one replica's `tenfold serve` is killed
    with SIGKILL in the middle of a stream: every SSE stream finishes exactly or ends with an explicit error event,
    every gRPC stream finishes exactly or ends with UNAVAILABLE, every plain request is answered exactly or 503 with
    Retry-After; Serve replaces the replica, the cluster serves again, and the killed server's engine processes stop
    by themselves."""
    import psutil

    prompts = random_prompts(STREAMS + GRPC_STREAMS, seed=470)
    expected = [greedy_reference(hf_models["mha"], p, STREAM_TOKENS, None)[0] for p in prompts]
    victim: dict[str, str] = {}
    mid_stream = threading.Event()

    def on_token(replica: str, count: int) -> None:
        if 0 < count < STREAM_TOKENS // 2 and not mid_stream.is_set():  # a stream the kill will cut
            victim.setdefault("id", replica)
            mid_stream.set()

    outcomes: list[str] = [""] * len(prompts)
    plain: list[str] = []
    stop = threading.Event()

    def run(i: int) -> None:
        outcomes[i] = (stream_outcome(cluster, prompts[i], expected[i], on_token) if i < STREAMS
                       else grpc_stream_outcome(stub, prompts[i], expected[i]))

    def plain_traffic() -> None:
        while not stop.is_set():
            plain.append(plain_outcome(cluster, prompts[0], expected[0][:12]))

    streams = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    traffic = [threading.Thread(target=plain_traffic) for _ in range(2)]
    for thread in [*streams, *traffic]:
        thread.start()
    try:
        assert mid_stream.wait(timeout=600), f"no stream started: {outcomes}"
        replicas = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
        server = psutil.Process(server_pid(replicas[victim["id"]]))
        engine = server.children(recursive=True)  # the engine core and its workers
        assert engine, "the replica's server has no engine processes"
        server.kill()  # the server alone: its engine processes must stop by themselves
        for thread in streams:
            thread.join(timeout=600)
        deadline = time.time() + 600
        while time.time() < deadline:  # Serve notices the failed health check and starts another replica
            now = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
            if len(set(now) - {victim["id"]}) == 2:
                break
            time.sleep(2)
    finally:
        stop.set()
        for thread in traffic:
            thread.join(timeout=300)
    sse, over_grpc = outcomes[:STREAMS], outcomes[STREAMS:]
    assert not [o for o in sse if o not in ("finished", "error", "refused")], sse
    assert sse.count("error") >= 1 and sse.count("finished") >= 1, sse
    assert not [o for o in over_grpc if o not in ("finished", "unavailable")], over_grpc
    assert not [o for o in plain if o not in ("finished", "refused")] and "finished" in plain, plain
    assert len(set(now) - {victim["id"]}) == 2, f"no replacement replica: {now}"
    assert generate(cluster, "base", prompts[1], n=STREAM_TOKENS)[0] == expected[1]
    assert generate(cluster, "heads", [5, 6, 7], n=2)[0]
    assert not wait_gone([p.pid for p in engine], ENGINE_EXIT_SECONDS), "the killed server's engine outlived it"


def test_stopping_the_cluster_stops_every_engine(cluster):
    """SIGTERM to `tenfold serve --replicas`: no replica's server, engine core or worker is left running."""
    import psutil

    replicas = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
    servers = [psutil.Process(server_pid(url)) for url in replicas.values()]
    assert len(servers) == 2, replicas
    engines = [p.pid for server in servers for p in [server, *server.children(recursive=True)]]
    cluster["process"].terminate()
    cluster["process"].wait(timeout=CLUSTER_STOP_SECONDS)
    assert not wait_gone(engines, ENGINE_EXIT_SECONDS), "engine processes outlived the cluster"
