"""`tenfold serve` against a real server subprocess: the official openai client over HTTP, a grpcio client over
gRPC (unary, streaming, cancel, admin, health), adapter admin with precise status codes, API-key protection,
adapter facts in /v1/models."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="tenfold serve runs vLLM (the cpu extra)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (test extra)")

import httpx  # noqa: E402

from adapter_cases import make  # noqa: E402
from serve_process import free_port, tenfold_server  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

KEY = "test-key-123"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dirs, specs, tmp_path_factory):
    spec = specs["mha"]
    static, root = tmp_path_factory.mktemp("static"), tmp_path_factory.mktemp("root")
    adapters = {"support": make("lorta_heads_out", spec, seed=201), "legal": make("miss", spec, seed=202),
                "late": make("loretta_rep", spec, seed=203), "blocky": make("bat", spec, seed=204)}
    save_adapter(adapters["support"], static / "support")
    for name in ("legal", "late", "blocky"):
        save_adapter(adapters[name], root / name)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")
    big = make("lora", spec, seed=205, r=32)
    save_adapter(big, root / "huge")
    for i in range(6):  # more adapters than the workers' cache holds (--max-cpu-loras 6)
        save_adapter(make("lorta_qv", spec, seed=300 + i), root / f"evict{i}")
        save_adapter(make("lora", spec, seed=320 + i), root / f"churn{i}")
    adapters["keep"] = make("miss", spec, seed=330)
    save_adapter(adapters["keep"], root / "keep")
    adapters["via-vllm"] = make("lorta_qv", spec, seed=331)
    save_adapter(adapters["via-vllm"], root / "via-vllm")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    grpc_port = free_port()
    # a size limit between the small adapters (< 0.5 MB) and the rank-32 LoRA on all modules (1.7 MB)
    with tenfold_server(tiny_model_dirs["mha"], log, "--adapter", f"support={static / 'support'}",
                        "--adapter-root", root, "--api-key", KEY, "--grpc-port", grpc_port, "--max-cpu-loras", 6,
                        env={"TENFOLD_MAX_ADAPTER_BYTES": "1000000"}) as running:
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {**running, "client": client, "adapters": adapters, "root": root, "grpc": f"127.0.0.1:{grpc_port}"}


def completion_tokens(client, model, prompt, n=16):
    response = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0.0, logprobs=1,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in response.choices[0].logprobs.tokens]


@pytest.mark.parametrize("model", ["base", "support", "legal", "blocky"])
def test_completions_match_reference(server, model, hf_models):
    """'legal' and 'blocky' (bat, served by the default native mode) are not loaded at start-up: they load from the
    adapter root on first use."""
    prompt = random_prompts(1, seed=210 + len(model))[0]
    expected = greedy_reference(hf_models["mha"], prompt, 16, server["adapters"].get(model))[0]
    assert completion_tokens(server["client"], model, prompt) == expected


def test_chat_and_streaming(server):
    chat = server["client"].chat.completions.create(model="support", max_tokens=8, temperature=0.0,
                                                    messages=[{"role": "user", "content": "Hello, how are you?"}])
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    stream = server["client"].completions.create(model="support", prompt="The river runs", max_tokens=8,
                                                 temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    plain = server["client"].completions.create(model="support", prompt="The river runs", max_tokens=8,
                                                temperature=0.0, extra_body={"ignore_eos": True})
    assert len(pieces) >= 2 and "".join(pieces) == plain.choices[0].text


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError):
        server["client"].completions.create(model="no-such-adapter", prompt="x", max_tokens=2)


def test_models_list_carries_adapter_facts(server):
    cards = {m["id"]: m for m in httpx.get(f"{server['url']}/v1/models").json()["data"]}
    facts = cards["support"]["adapter"]
    adapter = server["adapters"]["support"]
    assert facts["family"] == "lorta" and facts["rank"] == adapter.rank
    assert facts["params"] == adapter.num_params() and facts["bytes"] == adapter.nbytes()
    assert facts["residency"] in ("worker", "registered")
    assert "adapter" not in cards["base"]


def test_listings_show_server_paths_only_with_the_key(server, tiny_model_dirs):
    """/v1/models is open (no --protect-all): vLLM's cards name each adapter's directory and the model's in `root`,
    tenfold's facts the adapter's path; without the key neither is shown."""
    anonymous = httpx.get(f"{server['url']}/v1/models")
    assert anonymous.status_code == 200 and "support" in anonymous.text
    for secret in (str(server["root"].parent), str(tiny_model_dirs["mha"])):
        assert secret not in anonymous.text
    cards = {m["id"]: m for m in anonymous.json()["data"]}
    assert cards["support"]["root"] is None and "path" not in cards["support"]["adapter"]
    keyed = {m["id"]: m for m in httpx.get(f"{server['url']}/v1/models", headers=ADMIN).json()["data"]}
    assert keyed["support"]["adapter"]["path"] == keyed["support"]["root"]
    assert keyed["support"]["root"].endswith("support")


def test_admin_needs_the_key(server):
    url = f"{server['url']}/v1/adapters"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{server['url']}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "x"}
                      ).status_code == 401
    assert httpx.get(url, headers=ADMIN).status_code == 200


def test_vllms_own_load_route_loads_inside_the_root_only(server, hf_models):
    """vLLM's /v1/load_lora_adapter (tenfold's route in its place) loads by path inside --adapter-root, with the key."""
    load = f"{server['url']}/v1/load_lora_adapter"
    outside = httpx.post(load, json={"lora_name": "x", "lora_path": "/etc"}, headers=ADMIN, timeout=120)
    assert outside.status_code == 400 and "outside the adapter root" in outside.text
    path = str(server["root"] / "via-vllm")
    loaded = httpx.post(load, json={"lora_name": "via-vllm", "lora_path": path}, headers=ADMIN, timeout=120)
    assert loaded.status_code == 200, loaded.text
    prompt = random_prompts(1, seed=221)[0]
    expected = greedy_reference(hf_models["mha"], prompt, 16, server["adapters"]["via-vllm"])[0]
    assert completion_tokens(server["client"], "via-vllm", prompt) == expected
    unloaded = httpx.post(f"{server['url']}/v1/unload_lora_adapter", json={"lora_name": "via-vllm"}, headers=ADMIN)
    assert unloaded.status_code == 200, unloaded.text


def test_every_other_route_needs_the_key(server):
    """Deny by default on the real server (--api-key without --protect-all): vLLM's SageMaker routes are not mounted
    (their /adapters loaded any path and unloaded without the key), and routes outside tenfold's open lists need the
    key; health, serving and /metrics stay open."""
    url = server["url"]
    assert httpx.delete(f"{url}/adapters/support").status_code == 401
    assert httpx.delete(f"{url}/adapters/support", headers=ADMIN).status_code == 404
    assert httpx.post(f"{url}/adapters", json={"name": "evil", "src": "/etc"}).status_code == 401
    assert httpx.post(f"{url}/invocations", json={"model": "base", "prompt": "x", "max_tokens": 2}).status_code == 401
    assert httpx.post(f"{url}/invocations", json={"model": "base", "prompt": "x", "max_tokens": 2},
                      headers=ADMIN).status_code == 404
    for method, path in (("GET", "/version"), ("GET", "/openapi.json"), ("POST", "/v1/responses"),
                         ("POST", "/v1/unload_lora_adapter"), ("DELETE", "/v1/adapters/support/pin")):
        assert httpx.request(method, f"{url}{path}").status_code == 401, path
    assert httpx.get(f"{url}/version", headers=ADMIN).status_code == 200
    for path in ("/health", "/ping", "/metrics", "/v1/models"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert "support" in {m.id for m in server["client"].models.list().data}, "nothing was unloaded"


@pytest.mark.parametrize("body, status, message", [
    ({"name": "../etc"}, 400, "invalid adapter name"),
    ({"name": "x", "path": "/etc"}, 400, "outside the adapter root"),
    ({"name": "broken"}, 400, "not valid JSON"),
    ({"name": "absent"}, 404, "No adapter found"),
    ({"name": "support"}, 409, "already loaded"),
    ({"nam": "typo"}, 400, ""),
])
def test_admin_load_errors(server, body, status, message):
    response = httpx.post(f"{server['url']}/v1/adapters", json=body, headers=ADMIN, timeout=120)
    assert response.status_code == status and message in response.text, response.text


def test_oversized_adapter_is_413(server):
    response = httpx.post(f"{server['url']}/v1/adapters", json={"name": "huge"}, headers=ADMIN, timeout=120)
    assert response.status_code == 413 and "size limit" in response.text, response.text


def test_load_use_unload_cycle(server, hf_models):
    url = f"{server['url']}/v1/adapters"
    loaded = httpx.post(url, json={"name": "late"}, headers=ADMIN, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["family"] == "loretta_rep"
    names = {a["name"] for a in httpx.get(url, headers=ADMIN).json()["adapters"]}
    assert "late" in names
    prompt = random_prompts(1, seed=220)[0]
    expected = greedy_reference(hf_models["mha"], prompt, 16, server["adapters"]["late"])[0]
    assert completion_tokens(server["client"], "late", prompt) == expected
    assert httpx.delete(f"{url}/late", headers=ADMIN).status_code == 200
    assert httpx.delete(f"{url}/late", headers=ADMIN).status_code == 404
    assert "late" not in {a["name"] for a in httpx.get(url, headers=ADMIN).json()["adapters"]}


def test_every_unload_route_clears_the_pin(server):
    """vLLM's own /v1/unload_lora_adapter unpins too: the name loaded again is not pinned."""
    url = f"{server['url']}/v1/adapters"
    path = str(server["root"] / "legal")
    assert httpx.post(url, json={"name": "pinned_once", "path": path}, headers=ADMIN, timeout=120).status_code == 200
    assert httpx.post(f"{url}/pinned_once/pin", headers=ADMIN, timeout=120).json()["pinned"]
    unloaded = httpx.post(f"{server['url']}/v1/unload_lora_adapter", json={"lora_name": "pinned_once"}, headers=ADMIN,
                          timeout=120)
    assert unloaded.status_code == 200, unloaded.text
    again = httpx.post(url, json={"name": "pinned_once", "path": path}, headers=ADMIN, timeout=120)
    assert again.status_code == 200 and again.json()["pinned"] is False, again.text
    assert httpx.delete(f"{url}/pinned_once", headers=ADMIN, timeout=120).status_code == 200


# --- gRPC ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(server):
    import grpc

    from tenfold.server.grpc import load_protos

    pb, services = load_protos()
    channel = grpc.insecure_channel(server["grpc"])
    yield pb, services.TenfoldStub(channel), channel
    channel.close()


def test_grpc_generate_matches_reference(stub, hf_models, server):
    pb, client, _ = stub
    prompt = random_prompts(1, seed=230)[0]
    request = pb.GenerateRequest(adapter="support", token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParameters(max_tokens=16, temperature=0.0, ignore_eos=True))
    reply = client.Generate(request, timeout=120)
    assert list(reply.token_ids) == greedy_reference(hf_models["mha"], prompt, 16, server["adapters"]["support"])[0]
    assert reply.finish_reason == "length" and reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 16


def test_grpc_stream_equals_unary(stub):
    pb, client, _ = stub
    request = pb.GenerateRequest(adapter="legal", text="The river runs",
                                 sampling=pb.SamplingParameters(max_tokens=10, temperature=0.0, ignore_eos=True))
    chunks = list(client.GenerateStream(request, timeout=120))
    assert len(chunks) >= 2 and chunks[-1].finish_reason == "length"
    whole = client.Generate(request, timeout=120)
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text


def test_grpc_cancel_aborts_the_request(stub, server):
    pb, client, _ = stub
    request = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParameters(max_tokens=200, ignore_eos=True))
    call = client.GenerateStream(request, timeout=120)
    next(call)
    call.cancel()
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # the engine is free again: a short request still completes
    reply = client.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParameters(max_tokens=3)), timeout=120)
    assert reply.usage.completion_tokens == 3


def test_grpc_admin_and_errors(stub):
    import grpc

    pb, client, _ = stub
    auth = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.RpcError) as info:
        client.LoadAdapter(pb.LoadAdapterRequest(name="late"), timeout=120)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    loaded = client.LoadAdapter(pb.LoadAdapterRequest(name="late"), metadata=auth, timeout=120)
    assert loaded.family == "loretta_rep" and loaded.rank == 8
    anonymous = {a.name: a for a in client.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters}
    assert anonymous["late"].family == "loretta_rep" and not any(a.path for a in anonymous.values())
    keyed = {a.name: a for a in client.ListAdapters(pb.ListAdaptersRequest(), metadata=auth, timeout=60).adapters}
    assert keyed["late"].path.endswith("/late")
    codes = {"../x": grpc.StatusCode.INVALID_ARGUMENT, "absent": grpc.StatusCode.NOT_FOUND,
             "late": grpc.StatusCode.ALREADY_EXISTS, "huge": grpc.StatusCode.RESOURCE_EXHAUSTED,
             "broken": grpc.StatusCode.INVALID_ARGUMENT}
    for name, code in codes.items():
        with pytest.raises(grpc.RpcError) as info:
            client.LoadAdapter(pb.LoadAdapterRequest(name=name), metadata=auth, timeout=120)
        assert info.value.code() == code, (name, info.value.details())
    assert client.PinAdapter(pb.PinAdapterRequest(name="late"), metadata=auth, timeout=120).pinned
    client.UnpinAdapter(pb.PinAdapterRequest(name="late"), metadata=auth, timeout=60)
    client.UnloadAdapter(pb.UnloadAdapterRequest(name="late"), metadata=auth, timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        client.UnloadAdapter(pb.UnloadAdapterRequest(name="late"), metadata=auth, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.Generate(pb.GenerateRequest(adapter="no-such", text="x"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.Generate(pb.GenerateRequest(adapter="support"), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_health_and_reflection(stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="tenfold.v1.Tenfold"), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [response] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=30))
    names = {s.name for s in response.list_services_response.service}
    assert {"tenfold.v1.Tenfold", "grpc.health.v1.Health"} <= names


# --- metrics -------------------------------------------------------------------------------------------------------
def scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server['url']}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def evicted(samples) -> float:
    """Every adapter's evictions from the workers' cache, summed from the per-adapter counters."""
    return sum(v for (name, labels), v in samples.items() if name == "tenfold_adapter_tier_exits_total"
               and ("reason", "evicted") in labels and ("tier", "host") in labels)


def test_metrics_count_the_traffic(server):
    labels = {"adapter": "support", "family": "lorta"}
    before = scrape(server)
    prompts = random_prompts(3, seed=240)
    for prompt in prompts:
        completion_tokens(server["client"], "support", prompt, n=7)
    stream = server["client"].completions.create(model="support", prompt=prompts[0], max_tokens=5, temperature=0.0,
                                                 stream=True, extra_body={"ignore_eos": True})
    assert len([c for c in stream]) >= 2
    after = scrape(server)
    assert value(after, "tenfold_adapter_requests_total", **labels) - value(
        before, "tenfold_adapter_requests_total", **labels) == 4
    assert value(after, "tenfold_adapter_prompt_tokens_total", **labels) - value(
        before, "tenfold_adapter_prompt_tokens_total", **labels) == sum(map(len, prompts)) + len(prompts[0])
    assert value(after, "tenfold_adapter_generation_tokens_total", **labels) - value(
        before, "tenfold_adapter_generation_tokens_total", **labels) == 3 * 7 + 5
    for histogram in ("tenfold_adapter_time_to_first_token_seconds", "tenfold_adapter_e2e_request_latency_seconds"):
        assert value(after, f"{histogram}_count", **labels) - value(before, f"{histogram}_count", **labels) == 4
    assert value(after, "tenfold_resident_adapters", tier="registered") >= 1
    assert value(after, "tenfold_resident_adapter_bytes", tier="registered") > 0
    assert any(name.startswith("vllm:") for name, _ in after), "vLLM's own metrics are still exported"
    budget, used = value(after, "tenfold_adapter_memory_bytes", kind="budget"), value(
        after, "tenfold_adapter_memory_bytes", kind="used")
    assert 0 < used <= budget and value(after, "tenfold_adapter_memory_bytes", kind="beyond") >= 0
    assert ("tenfold_adapter_memory_beyond_budget_bytes_total", ()) in after


def test_metrics_count_loads_and_unloads(server):
    before = scrape(server)
    url = f"{server['url']}/v1/adapters"
    assert httpx.post(url, json={"name": "legal2", "path": str(server["root"] / "legal")}, headers=ADMIN,
                      timeout=120).status_code == 200
    loaded = scrape(server)
    resident_loaded = value(loaded, "tenfold_resident_adapters", tier="worker_cache")
    assert value(loaded, "tenfold_adapter_resident", adapter="legal2", family="miss", tier="host") == 1
    assert value(loaded, "tenfold_adapter_resident_bytes", adapter="legal2", family="miss", tier="host") == (
        server["adapters"]["legal"].nbytes())
    assert httpx.delete(f"{url}/legal2", headers=ADMIN).status_code == 200
    after = scrape(server)
    assert value(after, "tenfold_adapter_resident", adapter="legal2", family="miss", tier="host") == 0
    assert value(after, "tenfold_adapter_tier_exits_total", adapter="legal2", tier="host", reason="unloaded") == 1
    assert value(after, "tenfold_adapter_loads_total", family="miss") - value(
        before, "tenfold_adapter_loads_total", family="miss") == 1
    assert value(after, "tenfold_adapter_load_seconds_count", family="miss") - value(
        before, "tenfold_adapter_load_seconds_count", family="miss") == 1
    assert value(after, "tenfold_adapter_unloads_total") - value(before, "tenfold_adapter_unloads_total") == 1
    # the unload really left the workers' cache
    assert value(after, "tenfold_resident_adapters", tier="worker_cache") == resident_loaded - 1


# --- hot loading under traffic, reloads, more bad inputs ---------------------------------------------------------------
def test_hot_load_and_unload_during_traffic(server):
    import threading

    failures, done = [], []

    def traffic(model):
        client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=120)
        for i in range(5):
            try:
                out = client.completions.create(model=model, prompt=f"The market sells {i}", max_tokens=12,
                                                temperature=0.0, extra_body={"ignore_eos": True})
                done.append(out.usage.completion_tokens)
            except Exception as e:  # collected: the assertion below names them
                failures.append(f"{model}: {e!r}")

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("support", "base", "support")]
    for t in threads:
        t.start()
    url = f"{server['url']}/v1/adapters"
    for round_ in range(2):
        name = f"churn{round_}"
        assert httpx.post(url, json={"name": name, "path": str(server["root"] / "legal")}, headers=ADMIN,
                          timeout=120).status_code == 200
        assert httpx.delete(f"{url}/{name}", headers=ADMIN, timeout=120).status_code == 200
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    assert done == [12] * 15


def test_changed_adapter_is_served_after_reload(server, specs, hf_models):
    import shutil

    first, second = make("miss_mini", specs["mha"], seed=250), make("miss_mini", specs["mha"], seed=251)
    path = server["root"] / "swap"
    save_adapter(first, path)
    prompt = random_prompts(1, seed=252, min_len=70, max_len=70)[0]  # spans full KV blocks: prefix-cache relevant
    assert completion_tokens(server["client"], "swap", prompt) == greedy_reference(hf_models["mha"], prompt, 16,
                                                                                   first)[0]
    shutil.rmtree(path)
    save_adapter(second, path)  # rewritten in place, same name
    assert completion_tokens(server["client"], "swap", prompt) == greedy_reference(hf_models["mha"], prompt, 16,
                                                                                   second)[0]


def test_more_bad_inputs_keep_the_server_serving(server, tmp_path):
    from tenfold.adapters import ModelSpec

    other = ModelSpec(num_layers=3, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1024)
    save_adapter(make("lora", other, seed=260), server["root"] / "wrong_model")
    response = httpx.post(f"{server['url']}/v1/adapters", json={"name": "wrong_model"}, headers=ADMIN, timeout=120)
    assert response.status_code == 400 and "expected shape" in response.text
    with pytest.raises(openai.BadRequestError):  # resolved by name on first use, refused before the engine
        server["client"].completions.create(model="wrong_model", prompt="x", max_tokens=2)
    malformed = httpx.post(f"{server['url']}/v1/completions", content=b'{"model": "base", "prompt": ',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    bad_value = httpx.post(f"{server['url']}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": -3})
    assert bad_value.status_code == 400
    no_prompt = httpx.post(f"{server['url']}/v1/completions", json={"model": "base"})
    assert no_prompt.status_code == 400
    assert completion_tokens(server["client"], "support", [5, 6, 7], n=4)  # still serving


def test_metrics_count_evictions(server):
    """Using more adapters than the workers' cache holds evicts the least recently used ones. The workers count each
    adapter's tier entries and exits as they happen, so one scrape after the traffic sees every eviction."""
    before = scrape(server)
    for i in range(6):
        completion_tokens(server["client"], f"evict{i}", [5, 6, 7], n=2)
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert [delta("tenfold_adapter_tier_entries_total", adapter=f"evict{i}", tier="host") for i in range(6)] == [1] * 6
    # the cache (6) held adapters of earlier tests ('support' at least): the six new ones pushed them out
    assert evicted(after) - evicted(before) >= 1
    assert delta("tenfold_adapter_evictions_total") == evicted(after) - evicted(before)
    assert value(after, "tenfold_adapter_resident", adapter="evict5", family="lorta", tier="host") == 1
    assert value(after, "tenfold_resident_adapters", tier="worker_cache") <= 6
    assert "vllm:lora_requests_info" in {name for name, _ in after}, "vLLM's own LoRA metric stays as vLLM exports it"


def test_pinned_adapter_survives_eviction_pressure(server, hf_models):
    url = f"{server['url']}/v1/adapters"
    assert httpx.post(f"{url}/keep/pin", timeout=120).status_code == 401
    pinned = httpx.post(f"{url}/keep/pin", headers=ADMIN, timeout=120)  # loads it by name from the adapter root
    assert pinned.status_code == 200 and pinned.json()["pinned"] and "host" in pinned.json()["tiers"]
    before = scrape(server)
    for i in range(6):  # six more adapters through a 6-entry cache
        completion_tokens(server["client"], f"churn{i}", [7, 8, 9], n=2)
    after = scrape(server)
    assert value(after, "tenfold_adapter_resident", adapter="keep", family="miss", tier="host") == 1
    assert value(after, "tenfold_adapter_tier_exits_total", adapter="keep", tier="host", reason="evicted") == 0
    assert value(after, "tenfold_adapter_pinned", adapter="keep", family="miss") == 1
    assert evicted(after) - evicted(before) >= 1, "the others were evicted around the pin"
    prompt = random_prompts(1, seed=231)[0]
    expected = greedy_reference(hf_models["mha"], prompt, 8, server["adapters"]["keep"])[0]
    assert completion_tokens(server["client"], "keep", prompt, n=8) == expected


def test_pinning_more_than_fits_is_refused(server):
    url = f"{server['url']}/v1/adapters"
    httpx.post(f"{url}/keep/pin", headers=ADMIN, timeout=120)  # idempotent: pinned or not before
    assert httpx.post(f"{url}/churn0/pin", headers=ADMIN, timeout=120).status_code == 200
    refused = httpx.post(f"{url}/churn1/pin", headers=ADMIN, timeout=120)  # a 6-entry cache, 4 slots: 2 pins
    assert refused.status_code == 409 and "--max-cpu-loras 6" in refused.text, refused.text
    assert httpx.post(f"{url}/base/pin", headers=ADMIN, timeout=120).status_code == 400
    for name in ("churn3", "churn4", "churn2", "churn1", "churn5"):  # the four entries left serve the others
        assert completion_tokens(server["client"], name, [5, 6, 7], n=2)
    for name in ("keep", "churn0"):
        assert httpx.delete(f"{url}/{name}/pin", headers=ADMIN, timeout=60).status_code == 200
    assert httpx.delete(f"{url}/keep/pin", headers=ADMIN, timeout=60).status_code == 404
    listing = {a["name"]: a for a in httpx.get(url, headers=ADMIN).json()["adapters"]}
    assert not any(a["pinned"] for a in listing.values())
    assert value(scrape(server), "tenfold_adapter_pinned", adapter="keep", family="miss") == 0
