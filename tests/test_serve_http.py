"""`tenfold serve` over HTTP: the official openai client against a real server subprocess, adapter admin with
precise status codes, API-key protection, adapter facts in /v1/models."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="tenfold serve runs vLLM (the cpu extra)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (test extra)")

import httpx  # noqa: E402

from adapter_cases import make  # noqa: E402
from serve_process import tenfold_server  # noqa: E402
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
    log = tmp_path_factory.mktemp("log") / "serve.log"
    # a size limit between the small adapters (< 0.5 MB) and the rank-32 LoRA on all modules (1.7 MB)
    with tenfold_server(tiny_model_dirs["mha"], log, "--adapter", f"support={static / 'support'}",
                        "--adapter-root", root, "--api-key", KEY,
                        env={"TENFOLD_MAX_ADAPTER_BYTES": "1000000"}) as running:
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {**running, "client": client, "adapters": adapters, "root": root}


def completion_tokens(client, model, prompt, n=16):
    response = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0.0, logprobs=1,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in response.choices[0].logprobs.tokens]


@pytest.mark.parametrize("model", ["base", "support", "legal"])
def test_completions_match_reference(server, model, hf_models):
    """'legal' is not loaded at start-up: it loads from the adapter root on first use."""
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


def test_admin_needs_the_key(server):
    url = f"{server['url']}/v1/adapters"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{server['url']}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "x"}
                      ).status_code == 401
    assert httpx.get(url, headers=ADMIN).status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"name": "../etc"}, 400, "invalid adapter name"),
    ({"name": "x", "path": "/etc"}, 400, "outside the adapter root"),
    ({"name": "blocky"}, 400, "native path"),
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
