"""Adapter lifecycle under traffic (README, "Adapter lifecycle under traffic"): a `tenfold serve` with few slots
(--max-loras 2, --max-cpu-loras 3) takes concurrent HTTP and gRPC traffic over several families while a churn task
unloads, reloads, rewrites and evicts exactly the adapters the traffic uses and sends bad loads. Every response's
tokens must equal the HuggingFace reference of a version of its adapter that was on disk during the request; no
request may fail; every admin call must answer a status its situation allows; afterwards the engine serves, and
its adapter versions, worker residency and RSS are back to their level. Bounded: SOAK_SECONDS of churn per mode.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time

import pytest

pytest.importorskip("vllm", reason="tenfold serve runs vLLM (the cpu extra)")

import httpx  # noqa: E402

from adapter_cases import make  # noqa: E402
from serve_process import ENGINE_ARGS, free_port, running_server  # noqa: E402
from tenfold.adapters import ModelSpec, save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

SOAK_SECONDS = 30  # at least this long, and until MIN_CHURN_OPS churn operations and MIN_REQUESTS requests ran,
MIN_CHURN_OPS = 40  # but never longer than MAX_SOAK_SECONDS
MIN_REQUESTS = 60
MAX_SOAK_SECONDS = 240
SETTLE_SECONDS = 10  # after the last unload, every version must be freed within this
CLIENTS = 8
NEW_TOKENS = 10
VERSIONS = 2  # rewrites alternate between two seeds per adapter
FAMILIES = {"native": {"lora": "lora", "miss": "miss", "mini": "miss_mini", "bat": "bat", "lorta": "lorta_qv"},
            "convert": {"lora": "lora", "miss": "miss", "mini": "miss_mini", "lorta": "lorta_qv"}}
# what each admin call may answer while traffic re-resolves names from the adapter root at any moment
UNLOAD_OK = {200, 404}
LOAD_OK = {200, 409}  # 409: the name was loaded again by a request meanwhile (vLLM's route says so with a 400)


def already_loaded_as_409(response) -> int:
    """vLLM's load route answers a name loaded meanwhile with 400 "has already been loaded": any other 400 is not."""
    if response.status_code == 400 and "has already been loaded" in response.text:
        return 409
    return response.status_code


class VersionLog:
    """Which seed each adapter's files held, and when: a request may be served by any version on disk while it
    ran (the one it was admitted with)."""

    def __init__(self, names):
        self.lock = threading.Lock()
        self.history = {n: [(0, 0.0, None)] for n in names}  # (seed index, written at, replaced at)

    def rewrite(self, name, write):
        with self.lock:
            current = self.history[name][-1][0]
        nxt = (current + 1) % VERSIONS
        started = time.monotonic()
        write(nxt)
        with self.lock:
            seed, at, _ = self.history[name][-1]
            self.history[name][-1] = (seed, at, time.monotonic())
            self.history[name].append((nxt, started, None))

    def allowed(self, name, t0, t1):
        with self.lock:
            return {seed for seed, at, until in self.history[name] if at <= t1 and (until is None or until >= t0)}


def write_version(spec, case, seed, path):
    """Write a version beside the adapter, then move each file into place (os.replace is atomic per file; both
    versions share one config, so any mix of replaced files is a whole version)."""
    staging = path.parent / f".{path.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(make(case, spec, seed=seed), staging)
    for item in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):  # tensors first, config last
        os.replace(item, path / item.name)
    staging.rmdir()


def rss_of_tree(pid) -> int:
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def scrape_value(url, name) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exported")


@pytest.fixture(scope="module")
def soak_env(tiny_model_dirs, hf_models, specs, tmp_path_factory):
    spec, model = specs["mha"], hf_models["mha"]
    prompts = random_prompts(3, seed=700)
    cases = {c for modes in FAMILIES.values() for c in modes.values()}
    seeds = {case: [710 + 10 * i + v for v in range(VERSIONS)] for i, case in enumerate(sorted(cases))}
    refs = {("base", None, k): greedy_reference(model, p, NEW_TOKENS)[0] for k, p in enumerate(prompts)}
    for case in cases:
        for v, seed in enumerate(seeds[case]):
            adapter = make(case, spec, seed=seed)
            for k, p in enumerate(prompts):
                refs[(case, v, k)] = greedy_reference(model, p, NEW_TOKENS, adapter)[0]
    return {"spec": spec, "prompts": prompts, "seeds": seeds, "refs": refs, "model_dir": tiny_model_dirs["mha"],
            "tmp": tmp_path_factory}


def run_soak(env, mode):
    spec, prompts, seeds, refs = env["spec"], env["prompts"], env["seeds"], env["refs"]
    names = FAMILIES[mode]
    root = env["tmp"].mktemp(f"soak-{mode}")
    for name, case in names.items():
        save_adapter(make(case, spec, seed=seeds[case][0]), root / name)
    for i in range(3):  # fillers that push the adapters in use out of the workers' host cache
        save_adapter(make("lorta_qv", spec, seed=790 + i), root / f"filler{i}")
    other = ModelSpec(num_layers=3, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1024)
    save_adapter(make("lora", other, seed=799), root / "wrong_model")
    save_adapter(make("lora", spec, seed=798), root / "truncated")
    tensors = root / "truncated" / "adapter_model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])

    engine_args = list(ENGINE_ARGS)
    engine_args[engine_args.index("--max-loras") + 1] = "2"
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "tenfold.cli", "serve", env["model_dir"], "--port", port, "--adapter-root",
            root, "--grpc-port", grpc_port, "--mode", mode, "--max-cpu-loras", 3, *engine_args]
    log = env["tmp"].mktemp("log") / f"soak-{mode}.log"
    with running_server(argv, port, log) as server:
        return _soak(server, f"127.0.0.1:{grpc_port}", root, names, prompts, refs, spec, seeds)


def _soak(server, grpc_target, root, names, prompts, refs, spec, seeds):
    import grpc

    from tenfold.server.grpc import load_protos

    pb, services = load_protos()
    url = server["url"]
    versions = VersionLog(names)
    failures, wrong, unexpected = [], [], []
    counts = {"requests": 0, "churn": 0, "unload": 0, "load": 0, "rewrite": 0, "evict": 0, "bad": 0}
    lock = threading.Lock()

    def generate_http(http, model, prompt):
        r = http.post(f"{url}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_tokens_as_token_ids": True})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

    def generate_grpc(stub, model, prompt):
        request = pb.GenerateRequest(adapter="" if model == "base" else model, token_ids=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingParameters(max_tokens=NEW_TOKENS, temperature=0.0,
                                                                    ignore_eos=True))
        return list(stub.Generate(request, timeout=120).token_ids)

    def one_request(generate, handle, model, k):
        t0 = time.monotonic()
        try:
            tokens = generate(handle, model, prompts[k])
        except Exception as e:  # collected: the assertion names every one
            with lock:
                failures.append(f"{model}: {e!r}"[:400])
            return
        t1 = time.monotonic()
        if model == "base":
            ok = tokens == refs[("base", None, k)]
        else:
            ok = any(tokens == refs[(names[model], v, k)] for v in versions.allowed(model, t0, t1))
        with lock:
            counts["requests"] += 1
            if not ok:
                wrong.append((model, k, tokens))

    churn_done = threading.Event()

    def client(index):
        rng = random.Random(index)
        use_grpc = index % 2 == 1
        channel = grpc.insecure_channel(grpc_target) if use_grpc else None
        handle = services.TenfoldStub(channel) if use_grpc else httpx.Client(timeout=120)
        generate = generate_grpc if use_grpc else generate_http
        try:
            while not churn_done.is_set():
                one_request(generate, handle, rng.choice(["base", *names]), rng.randrange(len(prompts)))
        finally:
            channel.close() if use_grpc else handle.close()

    def admin_call(kind, name, call, allowed):
        status = call()
        with lock:
            if status not in allowed:
                unexpected.append((kind, name, status))

    def churn(started):
        rng = random.Random(1)
        http = httpx.Client(timeout=120)
        channel = grpc.insecure_channel(grpc_target)
        stub = services.TenfoldStub(channel)

        def grpc_status(fn, request):
            try:
                fn(request, timeout=120)
                return 200
            except grpc.RpcError as e:
                return {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
                        grpc.StatusCode.INVALID_ARGUMENT: 400}.get(e.code(), e.code())

        evictions = []
        bad_loads = [("../etc", 400), ("wrong_model", 400), ("truncated", 400), ("no-such-adapter", 404)]
        def enough():
            elapsed = time.monotonic() - started
            return elapsed > MAX_SOAK_SECONDS or (elapsed >= SOAK_SECONDS and counts["churn"] >= MIN_CHURN_OPS
                                                  and counts["requests"] >= MIN_REQUESTS)

        while not enough():
            name = rng.choice(list(names))
            op = rng.choices(["unload", "load", "rewrite", "evict", "bad"], weights=[3, 3, 3, 1, 1])[0]
            with lock:
                counts["churn"] += 1
                counts[op] += 1
            if op == "unload":
                how = rng.choice(["vllm", "rest", "grpc"])
                call = {"vllm": lambda: http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code,
                        "rest": lambda: http.delete(f"{url}/v1/adapters/{name}").status_code,
                        "grpc": lambda: grpc_status(stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name))}[how]
                admin_call(f"unload/{how}", name, call, UNLOAD_OK)
            elif op == "load":
                how = rng.choice(["vllm", "rest", "grpc"])
                call = {"vllm": lambda: already_loaded_as_409(http.post(f"{url}/v1/load_lora_adapter", json={
                            "lora_name": name, "lora_path": str(root / name)})),
                        "rest": lambda: http.post(f"{url}/v1/adapters", json={"name": name}).status_code,
                        "grpc": lambda: grpc_status(stub.LoadAdapter, pb.LoadAdapterRequest(name=name))}[how]
                admin_call(f"load/{how}", name, call, LOAD_OK)
            elif op == "rewrite":
                case = names[name]
                versions.rewrite(name, lambda v: write_version(spec, case, seeds[case][v], root / name))
            elif op == "evict":  # in the background: a filler request waits its turn behind the traffic
                filler = f"filler{rng.randrange(3)}"
                thread = threading.Thread(target=admin_call, args=("evict", filler, lambda f=filler: httpx.post(
                    f"{url}/v1/completions", json={"model": f, "prompt": [5, 6, 7], "max_tokens": 2},
                    timeout=120).status_code,
                    {200}))
                thread.start()
                evictions.append(thread)
            else:
                bad, status = rng.choice(bad_loads)
                admin_call("bad-load", bad, lambda: http.post(f"{url}/v1/adapters", json={"name": bad}).status_code,
                           {status})
            time.sleep(rng.uniform(0.05, 0.3))
        for thread in evictions:
            thread.join(timeout=300)
        churn_done.set()
        http.close()
        channel.close()

    # warm-up: every adapter and filler used once, so caches and allocator pools reach their working size
    warm = httpx.Client(timeout=120)
    for model in ["base", *names]:
        one_request(generate_http, warm, model, 0)
    for filler in ("filler0", "filler1", "filler2"):
        generate_http(warm, filler, prompts[0])
    assert not failures and not wrong, (failures, wrong)
    rss_before = rss_of_tree(server["process"].pid)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=churn, args=(started,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=MAX_SOAK_SECONDS + 300)
    wall = time.monotonic() - started

    # settle: the engine still serves every adapter exactly, then every name is unloaded and nothing lingers
    for model in ["base", *names]:
        one_request(generate_http, warm, model, 1)
    for name in [*names, "filler0", "filler1", "filler2"]:
        warm.delete(f"{url}/v1/adapters/{name}")
    registered_left = [a["name"] for a in warm.get(f"{url}/v1/adapters").json()["adapters"]]
    deadline = time.monotonic() + SETTLE_SECONDS  # ids replaced by racing registrations are freed by engine tasks
    while (versions_left := scrape_value(url, "tenfold_adapter_versions")) and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = httpx.get(f"{url}/metrics", timeout=30).text
    rss_after = rss_of_tree(server["process"].pid)
    warm.close()
    return {"failures": failures, "wrong": wrong, "unexpected": unexpected, "counts": counts, "wall": wall,
            "alive": server["process"].poll() is None, "versions_left": versions_left,
            "registered_left": registered_left, "metrics": workers,
            "rss_before": rss_before, "rss_after": rss_after}


@pytest.mark.parametrize("mode", ["native", "convert"])
def test_soak_unload_reload_rewrite_evict_under_traffic(soak_env, mode):
    result = run_soak(soak_env, mode)
    counts = result["counts"]
    summary = (f"{mode}: {counts['requests']} requests, {counts['churn']} churn operations ({counts['unload']} "
               f"unloads, {counts['load']} loads, {counts['rewrite']} rewrites, {counts['evict']} evictions, "
               f"{counts['bad']} bad loads), "
               f"{len(result['failures'])} failed, {len(result['wrong'])} wrong, {len(result['unexpected'])} "
               f"unexpected admin statuses, {result['wall']:.0f} s; RSS {result['rss_before'] / 2**20:.0f} -> "
               f"{result['rss_after'] / 2**20:.0f} MiB")
    print(summary)
    assert result["alive"], summary
    assert not result["failures"], (summary, result["failures"][:5])
    assert not result["wrong"], (summary, result["wrong"][:5])
    assert not result["unexpected"], (summary, result["unexpected"][:10])
    assert counts["requests"] >= MIN_REQUESTS and counts["churn"] >= MIN_CHURN_OPS, summary
    assert result["registered_left"] == [], summary
    assert result["versions_left"] == 0, summary  # every version freed once its name was unloaded
    assert 'tenfold_resident_adapters{tier="worker_cache"} 0.0' in result["metrics"], summary
    assert result["rss_after"] < result["rss_before"] * 1.1 + 100 * 2**20, summary
