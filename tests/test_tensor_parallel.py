"""Native mode under vLLM's tensor parallelism on the CPU build (--tensor-parallel-size 2, one core per rank): a batch
mixing base rows and every family gives the greedy tokens of the same engine on one rank, and HuggingFace's; an
adapter whose blocks do not shard is refused before it reaches the workers while the engine keeps serving."""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="the tensor-parallel tests need vllm (the cpu extra) installed")

from adapter_cases import make  # noqa: E402
from tenfold.adapters import FAMILIES, save_adapter  # noqa: E402
from test_vllm_plugin import NEW_TOKENS, SERVED_CASES, check_against_reference, generate  # noqa: E402
from vllm_reference import random_prompts  # noqa: E402

CASES = SERVED_CASES["native"]


def engine(model_dir, tensor_parallel_size):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", tensor_parallel_size=tensor_parallel_size, enable_lora=True,
               max_loras=len(CASES) + 1, max_lora_rank=64, max_model_len=256, max_num_seqs=32, enforce_eager=True,
               seed=0, block_size=32, enable_prefix_caching=False)


def mixed_batch(served):
    """Base rows around one request of every family; fresh random prompts."""
    cases = [None, *CASES, None]
    prompts = random_prompts(len(cases), seed=31)
    return cases, prompts, [request_for(served, c, CASES.index(c)) if c else None for c in cases]


@pytest.fixture(scope="module", params=["mha", "gqa"])
def served_tp(request, tiny_model_dirs, specs, hf_models, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"tp-adapters-{name}")
    adapters = {}
    for i, case in enumerate(CASES):
        adapters[case] = make(case, specs[name], seed=600 + i)
        save_adapter(adapters[case], root / case)
    # r=48 does not divide the 128 input columns of o_proj each rank holds (unsharded, MiSS zero-pads: fine)
    straddling = FAMILIES["miss"].create(specs[name], target_modules=["o_proj"], r=48, seed=9)
    save_adapter(straddling, root / "straddling")
    previous = {k: os.environ.get(k) for k in ("TENFOLD_MODE", "OMP_NUM_THREADS")}
    os.environ["TENFOLD_MODE"] = "native"
    served = {"name": name, "mode": "native", "root": root, "adapters": adapters, "model": hf_models[name]}
    # the same batch on one rank first (its engine is gone before the two-rank one starts)
    single = engine(tiny_model_dirs[name], 1)
    cases, prompts, requests = mixed_batch(served)
    served["tp1_outputs"] = generate(single, prompts, requests)
    single.llm_engine.engine_core.shutdown()
    del single
    gc.collect()
    os.environ["OMP_NUM_THREADS"] = "1"  # one core per rank on the 2-core CI machine
    served["llm"] = engine(tiny_model_dirs[name], 2)
    yield served
    served["llm"].llm_engine.engine_core.shutdown()
    del served["llm"]
    gc.collect()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def request_for(served, case, index):
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=case, lora_int_id=index + 1, lora_path=str(served["root"] / case))


def test_mixed_family_batch_on_two_ranks_gives_the_tokens_of_one_rank_and_of_huggingface(served_tp):
    cases, prompts, requests = mixed_batch(served_tp)
    outputs = generate(served_tp["llm"], prompts, requests)
    for case, (tokens, _), (tp1_tokens, _) in zip(cases, outputs, served_tp["tp1_outputs"]):
        assert len(tokens) == NEW_TOKENS and tokens == tp1_tokens, f"{case or 'base'}: TP=2 differs from TP=1"
    check_against_reference(served_tp, prompts, cases, outputs)


def test_an_adapter_that_does_not_shard_is_refused_and_the_engine_keeps_serving(served_tp):
    from vllm import SamplingParams

    bad = request_for(served_tp, "straddling", len(CASES))
    with pytest.raises(Exception, match=r"straddle the tensor-parallel shard of o_proj's input"):
        served_tp["llm"].generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), lora_request=bad,
                                  use_tqdm=False)
    prompts = random_prompts(2, seed=32)
    cases = ["bat", None]
    outputs = generate(served_tp["llm"], prompts, [request_for(served_tp, "bat", CASES.index("bat")), None])
    check_against_reference(served_tp, prompts, cases, outputs)
