"""A hostile tenant against a real `tenfold serve --api-key K --protect-all --adapter-root ROOT`: every attack is
answered 401 or another 4xx (never a 5xx, never served), the engine keeps serving, the honest tenants' greedy tokens
stay exactly the reference's, and the server's memory does not grow with the attacks."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="tenfold serve runs vLLM (the cpu extra)")

import httpx  # noqa: E402
import torch  # noqa: E402

import official_layouts as layouts  # noqa: E402
from adapter_cases import make  # noqa: E402
from serve_process import tenfold_server  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

KEY = "hostile-test-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
RSS_GROWTH_LIMIT = 300 << 20


def _rewrite_config(directory, edit):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))  # Python's json writes NaN/Infinity, as a hostile tool would


def hostile_adapters(root, outside, spec) -> dict[str, str]:
    """Adapter directories under `root` that must all be refused; name -> what is wrong with it."""
    cases = {}
    nan_alpha = save_adapter(make("lora", spec, seed=501), root / "nan-alpha")
    _rewrite_config(nan_alpha, lambda c: c["config"].update(lora_alpha=float("nan")))
    cases["nan-alpha"] = "NaN in a config"
    inf_scale = layouts.lorta_fork(make("lorta_heads_out", spec, seed=502), root / "inf-alpha")
    _rewrite_config(inf_scale, lambda c: c.update(lora_alpha=float("inf")))
    cases["inf-alpha"] = "Infinity in a config"
    poisoned = make("miss", spec, seed=503)
    next(iter(poisoned.tensors().values())).data[0, 0] = float("nan")
    save_adapter(poisoned, root / "nan-tensor")
    cases["nan-tensor"] = "NaN in a tensor"
    # a tensor file that is a link to another tenant's (or any) file outside the root
    secret = save_adapter(make("miss", spec, seed=504), outside / "secret")
    linked = root / "symlink"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((secret / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(secret / "adapter_model.safetensors")
    cases["symlink"] = "a tensor file linked to a file outside the root"
    rep = make("loretta_rep", spec, seed=505)
    layouts.loretta_rep(rep, root / "huge-r")
    _rewrite_config(root / "huge-r", lambda c: c.update(r=1 << 20))
    cases["huge-r"] = "a TT rank that would contract to GiBs"
    zero_r = save_adapter(make("miss", spec, seed=506), root / "zero-r")
    _rewrite_config(zero_r, lambda c: c["config"].update(r=0))
    cases["zero-r"] = "r: 0"
    nested = root / "nested"
    nested.mkdir()
    (nested / "adapter_config.json").write_text('{"peft_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    save_adapter(make("lora", spec, seed=507), outside / "nested-weights")
    (nested / "adapter_model.safetensors").write_bytes((outside / "nested-weights" /
                                                        "adapter_model.safetensors").read_bytes())
    cases["nested"] = "deeply nested JSON"
    oversized = save_adapter(make("lora", spec, seed=508), root / "big-config")
    _rewrite_config(oversized, lambda c: c.update(padding="x" * (8 << 20)))
    cases["big-config"] = "an 8 MB config"
    # a pickled core that claims 2^31 elements but stores one (stride 0): densifying it asks for 8 GiB
    expanded = root / "stride-zero"
    layouts.loretta_rep(make("loretta_rep", spec, seed=509), expanded)
    cores = torch.load(expanded / "adapter_model.bin", weights_only=True)
    first = next(iter(cores))
    cores[first] = torch.zeros(1).expand(1 << 31)
    torch.save(cores, expanded / "adapter_model.bin")
    cases["stride-zero"] = "a stride-0 expanded tensor"
    truncated = save_adapter(make("bat", spec, seed=510), root / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["truncated"] = "a truncated tensor file"
    return cases


@pytest.fixture(scope="module")
def server(tiny_model_dirs, specs, tmp_path_factory):
    spec = specs["mha"]
    root, outside = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("outside")
    honest = {"tenant-a": make("lorta_heads_out", spec, seed=520), "tenant-b": make("miss", spec, seed=521),
              "tenant-c": make("loretta_adp", spec, seed=522)}
    for name, adapter in honest.items():
        save_adapter(adapter, root / name)
    hostile = hostile_adapters(root, outside, spec)
    log, tmp = tmp_path_factory.mktemp("log") / "serve.log", tmp_path_factory.mktemp("tmp")
    with tenfold_server(tiny_model_dirs["mha"], log, "--adapter-root", root, "--api-key", KEY, "--protect-all",
                        "--grpc-port", 0, env={"TMPDIR": str(tmp)}) as running:
        yield {**running, "honest": honest, "hostile": hostile, "root": root, "outside": outside, "tmp": tmp}


def completion(server, model, prompt, n=12, headers=ADMIN, **extra):
    return httpx.post(f"{server['url']}/v1/completions", headers=headers, timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
                            "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True, **extra})


def tokens(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


def honest_tokens_match(server, hf_models, seed) -> None:
    """Every honest tenant and the base model, in one concurrent batch, against the HF reference."""
    prompts = random_prompts(len(server["honest"]) + 1, seed=seed)
    models = ["base", *server["honest"]]
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda mp: tokens(completion(server, *mp)), zip(models, prompts)))
    for model, prompt, got in zip(models, prompts, answers):
        expected = greedy_reference(hf_models["mha"], prompt, 12, server["honest"].get(model))[0]
        assert got == expected, model


def tree_rss(process) -> int:
    import psutil

    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_hostile_tenant_gets_nothing(server, hf_models):
    url = server["url"]
    honest_tokens_match(server, hf_models, seed=530)  # also warms every honest adapter
    rss_before = tree_rss(server["process"])
    answers: dict[str, httpx.Response] = {}

    # no key, or a wrong one: nothing but health answers
    for method, path, body in [("GET", "/v1/adapters", None), ("DELETE", "/v1/adapters/tenant-a", None),
                               ("DELETE", "/adapters/tenant-a", None),
                               ("POST", "/adapters", {"name": "x", "src": str(server["outside"] / "secret")}),
                               ("POST", "/invocations", {"model": "tenant-a", "prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/completions", {"model": "tenant-a", "prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "tenant-a"}),
                               ("POST", "/v1/adapters/tenant-a/pin", None)]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
            answers[f"{method} {path} {headers}"] = response
            assert response.status_code in (401, 404, 405), (method, path, response.status_code, response.text)
    listing = httpx.get(f"{url}/v1/models", timeout=60)
    assert listing.status_code == 401 or str(server["root"]) not in listing.text, "a listing showed server paths"

    # adapters that must be refused, asked for by name (resolved from the root) and loaded by an admin
    for name, why in server["hostile"].items():
        for response in (completion(server, name, "hello", n=2),
                         httpx.post(f"{url}/v1/adapters", json={"name": name}, headers=ADMIN, timeout=300)):
            answers[f"{name}: {why}"] = response
            assert 400 <= response.status_code < 500, (why, response.status_code, response.text)
            assert "Traceback" not in response.text
    # a flood of requests for one bad adapter is refused each time, cheaply (one check per version)
    with ThreadPoolExecutor(8) as pool:
        flood = list(pool.map(lambda _: completion(server, "nan-tensor", "hi", n=1).status_code, range(40)))
    assert set(flood) == {400}, flood

    # names and paths that try to leave the root, and malformed requests
    for body in ({"name": "../tenant-a"}, {"name": "tenant-a\n"}, {"name": "x", "path": "/etc"},
                 {"name": "x", "path": str(server["root"] / ".." / "outside")},
                 {"name": "linked", "path": str(server["outside"] / "secret")}, {"name": ["a"]}, {"nam": "typo"}):
        response = httpx.post(f"{url}/v1/adapters", json=body, headers=ADMIN, timeout=120)
        assert 400 <= response.status_code < 500, (body, response.text)
    for model in ("../tenant-a", "tenant-a\n", "tenant-a/../tenant-b", "x" * 5000):
        response = completion(server, model, "hi", n=1)
        assert 400 <= response.status_code < 500, (model, response.text)
    for raw in (b"{", b"[]", b'{"model": "tenant-a", "prompt": "hi", "max_tokens": -5}',
                b'{"model": "tenant-a", "prompt": [1e400], "max_tokens": 2}', b"\xff\xfe"):
        response = httpx.post(f"{url}/v1/completions", content=raw, timeout=60,
                              headers={**ADMIN, "content-type": "application/json"})
        assert 400 <= response.status_code < 500, (raw, response.status_code, response.text)
    for abuse in ({"n": 10**6}, {"max_tokens": 10**9}, {"logprobs": 10**6}, {"prompt": [5] * 100_000},
                  {"stop": ["x"] * 100_000}, {"temperature": float("nan")}, {"top_p": float("inf")}):
        body = json.dumps({"model": "tenant-a", "prompt": "hi", "max_tokens": 2, **abuse})  # NaN as Python writes it
        response = httpx.post(f"{url}/v1/completions", content=body, timeout=300,
                              headers={**ADMIN, "content-type": "application/json"})
        assert 400 <= response.status_code < 500, (list(abuse)[0], response.status_code, response.text[:300])

    # the engine still serves, exactly, and the attacks cost no lasting memory
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    honest_tokens_match(server, hf_models, seed=531)
    growth = tree_rss(server["process"]) - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"the server's memory grew by {growth >> 20} MiB under attack"
    names = {a["name"] for a in httpx.get(f"{url}/v1/adapters", headers=ADMIN, timeout=60).json()["adapters"]}
    assert not names & set(server["hostile"]), "a refused adapter was registered"


def test_snapshots_hold_registered_versions_only_and_go_with_the_server(server):
    """Refused adapters leave no snapshot; a SIGTERM'd server removes its snapshots on the way out."""
    import signal

    roots = list(server["tmp"].glob("tenfold-adapter-versions-*"))
    snapshots = [d.name for r in roots for d in r.iterdir()]
    assert len(roots) == 1 and len(snapshots) == len(server["honest"]), snapshots
    server["process"].send_signal(signal.SIGTERM)
    server["process"].wait(timeout=120)
    assert not list(server["tmp"].glob("tenfold-adapter-versions-*"))
