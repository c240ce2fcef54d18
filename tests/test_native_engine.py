"""The native path in a running vLLM engine beyond the mixed-family suite: hundreds of distinct adapters resident at
once, and slots reused across families after removal and eviction."""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="the native engine tests need vllm (the cpu extra) installed")

from adapter_cases import make  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

SLOTS = 256
NEW_TOKENS = 6
FAMILY_CASES = ["lorta_heads_out", "miss", "lora", "bat", "loretta_adp", "loretta_rep", "lorta_heads_in", "miss_mini"]


@pytest.fixture(scope="module")
def engine256(tiny_model_dirs, hf_models, monkeypatch_module):
    from vllm import LLM

    monkeypatch_module.setenv("TENFOLD_MODE", "native")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(tiny_model_dirs["gqa"]), dtype="float32", enable_lora=True, max_loras=SLOTS,
              max_cpu_loras=SLOTS, max_lora_rank=16, max_model_len=128, max_num_seqs=SLOTS,
              max_num_batched_tokens=4096, enforce_eager=True, seed=0, block_size=32)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def run(llm, prompts, requests):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_256_distinct_adapters_in_one_batch(engine256, specs, hf_models, tmp_path):
    """256 adapters of every family, one request each, in one generate call with max_loras=256: all resident in
    the workers' slots at once; a sample of every family (and the base rows) equals the HuggingFace reference."""
    from vllm.lora.request import LoRARequest

    spec = specs["gqa"]
    adapters, requests = {}, []
    for i in range(SLOTS):
        case = FAMILY_CASES[i % len(FAMILY_CASES)]
        name = f"a{i:03d}-{case}"
        adapters[name] = make(case, spec, seed=1000 + i)
        save_adapter(adapters[name], tmp_path / name)
        requests.append(LoRARequest(name, 10 + i, str(tmp_path / name)))
    prompts = random_prompts(SLOTS + 4, seed=21, max_len=12)
    names = list(adapters) + [None] * 4
    outputs = run(engine256, prompts, requests + [None] * 4)
    assert len(engine256.llm_engine.list_loras()) == SLOTS
    checked = list(range(0, SLOTS, 13)) + [SLOTS, SLOTS + 3]  # every family appears among these
    assert {FAMILY_CASES[i % len(FAMILY_CASES)] for i in checked if i < SLOTS} == set(FAMILY_CASES)
    for i in checked:
        adapter = adapters[names[i]] if names[i] else None
        want = greedy_reference(hf_models["gqa"], prompts[i], NEW_TOKENS, adapter)[0]
        assert outputs[i] == want, names[i] or "base"


def test_a_slot_reused_across_families_serves_the_new_adapter(engine256, specs, hf_models, tmp_path):
    """With every slot freed, a bat adapter takes slot 0; once it is removed, a miss adapter takes the same slot and
    must give the miss result (no bat factors left behind). Then 256 new adapters evict everything by LRU and the
    bat adapter, loaded again, is exact again."""
    from vllm.lora.request import LoRARequest

    spec = specs["gqa"]
    llm = engine256.llm_engine
    for lora_id in list(llm.list_loras()):
        llm.remove_lora(lora_id)
    bat, miss = make("bat", spec, seed=61), make("miss", spec, seed=62)
    save_adapter(bat, tmp_path / "bat")
    save_adapter(miss, tmp_path / "miss")
    prompts = random_prompts(2, seed=22, max_len=12)
    model = hf_models["gqa"]
    bat_request = LoRARequest("bat", 5000, str(tmp_path / "bat"))
    [tokens, base] = run(engine256, prompts, [bat_request, None])
    assert tokens == greedy_reference(model, prompts[0], NEW_TOKENS, bat)[0]
    assert base == greedy_reference(model, prompts[1], NEW_TOKENS)[0]
    llm.remove_lora(5000)
    [tokens, base] = run(engine256, prompts, [LoRARequest("miss", 5001, str(tmp_path / "miss")), None])
    assert tokens == greedy_reference(model, prompts[0], NEW_TOKENS, miss)[0], "slot 0 must now serve miss"
    assert base == greedy_reference(model, prompts[1], NEW_TOKENS)[0]

    fillers = []
    for i in range(SLOTS):
        save_adapter(make("lorta_qv", spec, seed=2000 + i), tmp_path / f"fill{i}")
        fillers.append(LoRARequest(f"fill{i}", 6000 + i, str(tmp_path / f"fill{i}")))
    run(engine256, random_prompts(SLOTS, seed=23, max_len=8), fillers)
    assert 5001 not in llm.list_loras(), "the miss adapter was evicted"
    [tokens] = run(engine256, prompts[:1], [bat_request])
    assert tokens == greedy_reference(model, prompts[0], NEW_TOKENS, bat)[0]
