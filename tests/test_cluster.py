"""`tenfold serve --replicas 2` on Ray Serve (a local Ray, 2 replicas of the tiny model with half a CPU each): tokens
through the ingress (HTTP and gRPC) equal the reference for base and several families, gRPC's admin calls and errors
are the single engine's, repeated requests for an adapter land on the
replica that holds it, a pin reaches every replica and survives eviction pressure, each engine's residency metrics
follow, a replica that cannot load an adapter answers the single engine's error, and killing one replica's engine
under traffic loses no request without a retryable error while Serve replaces the replica."""

from __future__ import annotations

import sys
import threading
import time

import pytest

pytest.importorskip("vllm", reason="the replicas run vLLM (the cpu extra)")
pytest.importorskip("ray.serve", reason="tenfold serve --replicas runs on Ray Serve (the ray extra)")
openai = pytest.importorskip("openai", reason="the cluster tests use the official openai client (test extra)")

import httpx  # noqa: E402

from adapter_cases import make  # noqa: E402
from serve_process import ENGINE_ARGS, free_port, running_server  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

KEY = "cluster-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
CASES = {"heads": "lorta_heads_out", "blocks": "miss", "weighted": "bat", "train": "loretta_rep"}


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
            "--replica-log-dir", logs, *ENGINE_ARGS, "--max-cpu-loras", 4, "--max-loras", 2]
    with running_server(argv, port, logs / "cluster.log", startup_timeout=600) as running:
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused", max_retries=0, timeout=180)
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
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
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
    reply, call = client.Generate.with_call(request, timeout=180)
    expected = greedy_reference(hf_models["mha"], prompt, 12, cluster["adapters"]["weighted"])[0]
    assert list(reply.token_ids) == expected and reply.finish_reason == "length"
    served = dict(call.trailing_metadata())
    assert served.get("x-tenfold-replica") and served.get("x-tenfold-adapter-loaded") in ("0", "1")
    chunks = list(client.GenerateStream(request, timeout=180))
    assert len(chunks) >= 2 and [t for c in chunks for t in c.token_ids] == expected
    base = client.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=request.sampling),
                           timeout=180)
    assert list(base.token_ids) == greedy_reference(hf_models["mha"], prompt, 12, None)[0]


def test_grpc_admin_and_errors_are_the_single_engines(stub):
    import grpc

    pb, client = stub
    auth = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.RpcError) as info:
        client.LoadAdapter(pb.LoadAdapterRequest(name="z5"), timeout=180)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    loaded = client.LoadAdapter(pb.LoadAdapterRequest(name="z5"), metadata=auth, timeout=180)
    assert loaded.name == "z5" and loaded.family == "lora"
    assert "z5" in {a.name for a in client.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters}
    for name, code in {"absent": grpc.StatusCode.NOT_FOUND, "broken": grpc.StatusCode.INVALID_ARGUMENT,
                       "../x": grpc.StatusCode.INVALID_ARGUMENT}.items():
        with pytest.raises(grpc.RpcError) as info:
            client.LoadAdapter(pb.LoadAdapterRequest(name=name), metadata=auth, timeout=180)
        assert info.value.code() == code, (name, info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            client.Generate(pb.GenerateRequest(adapter=name, text="x"), timeout=180)
        assert info.value.code() == code, (name, info.value.details())
    client.UnloadAdapter(pb.UnloadAdapterRequest(name="z5"), metadata=auth, timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        client.UnloadAdapter(pb.UnloadAdapterRequest(name="z5"), metadata=auth, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.Generate(pb.GenerateRequest(adapter="heads"), timeout=60)  # no prompt
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


def test_killing_a_replicas_engine_loses_no_request_silently(cluster):
    """Every request either completes with the right tokens or gets a retryable 503; the ingress keeps serving and
    Serve starts a replacement replica."""
    import psutil

    prompt = random_prompts(1, seed=460)[0]
    expected, _, _ = generate(cluster, "base", prompt)
    before = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
    victim_id, victim_url = sorted(before.items())[0]
    port = int(victim_url.rsplit(":", 1)[1])
    outcomes, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            response = httpx.post(f"{cluster['url']}/v1/completions", timeout=180,
                                  json={"model": "base", "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                                        "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True})
            if response.status_code == 200:
                tokens = [int(t.removeprefix("token_id:"))
                          for t in response.json()["choices"][0]["logprobs"]["tokens"]]
                outcomes.append("ok" if tokens == expected else f"wrong tokens {tokens}")
            else:
                retryable = response.status_code == 503 and response.headers.get("retry-after")
                outcomes.append("retry" if retryable else f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    engine = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                  and c.status == psutil.CONN_LISTEN)
    process = psutil.Process(engine)
    for doomed in [*process.children(recursive=True), process]:
        doomed.kill()
    deadline = time.time() + 300
    while time.time() < deadline:  # Serve notices the failed health check and starts another replica
        now = httpx.get(f"{cluster['url']}/v1/replicas", headers=ADMIN, timeout=30).json()["replicas"]
        if len(set(now) - {victim_id}) == 2:
            break
        time.sleep(2)
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(timeout=200)
    bad = [o for o in outcomes if o not in ("ok", "retry")]
    assert not bad and outcomes.count("ok") > 0, outcomes
    assert len(set(now) - {victim_id}) == 2, f"no replacement replica: {now}"
    assert generate(cluster, "heads", [5, 6, 7], n=2)[0]
