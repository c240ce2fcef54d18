"""The plugin inside vLLM's own OpenAI server: native adapter directories in --lora-modules, the adapter-root
resolver, path-traversal names refused; queried with the official openai client."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("vllm", reason="the server tests need vllm (the cpu extra) installed")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (test extra)")

from adapter_cases import make  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from serve_process import ENGINE_ARGS, free_port, running_server  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_model_dirs, specs, tmp_path_factory):
    spec = specs["mha"]
    static, root = tmp_path_factory.mktemp("static"), tmp_path_factory.mktemp("root")
    adapters = {"lorta": make("lorta_heads_in", spec, seed=41), "miss": make("miss_mini", spec, seed=42),
                "rep_from_root": make("loretta_rep", spec, seed=43)}
    save_adapter(adapters["lorta"], static / "lorta")
    save_adapter(adapters["miss"], static / "miss")
    save_adapter(adapters["rep_from_root"], root / "rep_from_root")
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dirs["mha"],
            "--enable-lora", "--lora-modules", f"lorta={static / 'lorta'}", f"miss={static / 'miss'}",
            "--host", "127.0.0.1", "--port", port, *ENGINE_ARGS]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "TENFOLD_ADAPTER_ROOT": str(root)}
    with running_server(argv, port, tmp_path_factory.mktemp("log") / "server.log", env) as running:
        client = openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused", max_retries=0, timeout=120)
        yield {"client": client, "adapters": adapters}


def complete(client, model, prompt):
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    choice = response.choices[0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return tokens, choice.logprobs.token_logprobs


def test_models_list_names_the_static_adapters(server):
    ids = {m.id for m in server["client"].models.list().data}
    assert {"base", "lorta", "miss"} <= ids


@pytest.mark.parametrize("model", ["base", "lorta", "miss", "rep_from_root"])
def test_completions_match_huggingface(server, model, hf_models):
    prompt = random_prompts(1, seed=50 + len(model))[0]
    tokens, logprobs = complete(server["client"], model, prompt)
    ref_tokens, ref_logprobs = greedy_reference(hf_models["mha"], prompt, NEW_TOKENS, server["adapters"].get(model))
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= 5e-5


@pytest.mark.parametrize("name", ["../static", "..", "a/../../etc", "/etc/passwd", "does_not_exist"])
def test_unknown_or_escaping_names_are_not_found(server, name):
    with pytest.raises(openai.NotFoundError):
        complete(server["client"], name, [5, 6, 7])
    tokens, _ = complete(server["client"], "base", [5, 6, 7])  # still serving
    assert len(tokens) == NEW_TOKENS


def test_runtime_load_of_native_directories(server, specs, hf_models, tmp_path):
    """/v1/load_lora_adapter takes native directories, a family without a LoRA form (bat) included: the plain vLLM
    server runs tenfold's default native mode (convert mode's refusal is tested in test_vllm_plugin)."""
    import httpx

    base_url = str(server["client"].base_url).removesuffix("/v1/").removesuffix("/v1")
    adapter = make("lorta_heads_out", specs["mha"], seed=44)
    save_adapter(adapter, tmp_path / "late")
    bat = make("bat", specs["mha"], seed=45)
    save_adapter(bat, tmp_path / "bat")
    ok = httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(tmp_path / "late")},
                    timeout=120)
    assert ok.status_code == 200, ok.text
    loaded = httpx.post(f"{base_url}/v1/load_lora_adapter",
                        json={"lora_name": "bat", "lora_path": str(tmp_path / "bat")}, timeout=120)
    assert loaded.status_code == 200, loaded.text

    prompt = random_prompts(1, seed=60)[0]
    for name, expected in (("late", adapter), ("bat", bat)):
        tokens, _ = complete(server["client"], name, prompt)
        assert tokens == greedy_reference(hf_models["mha"], prompt, NEW_TOKENS, expected)[0], name


def test_runtime_load_errors_have_precise_status(server, specs, tmp_path):
    import httpx

    base_url = str(server["client"].base_url).removesuffix("/v1/").removesuffix("/v1")
    from tenfold.adapters import ModelSpec

    other = ModelSpec(num_layers=3, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1024)
    save_adapter(make("lora", other, seed=46), tmp_path / "wrong_model")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    cases = {"wrong_model": (400, "expected shape"), "corrupt": (400, "not valid JSON"),
             "missing": (404, "No adapter found")}
    for name, (status, message) in cases.items():
        response = httpx.post(f"{base_url}/v1/load_lora_adapter",
                              json={"lora_name": name, "lora_path": str(tmp_path / name)}, timeout=120)
        assert response.status_code == status and message in response.text, (name, response.text)
    tokens, _ = complete(server["client"], "lorta", [5, 6, 7])
    assert len(tokens) == NEW_TOKENS
