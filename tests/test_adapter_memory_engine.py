"""The adapter memory budget in a running engine (issue 17): an engine started with a budget that holds two
buckets serves three, evicting adapters a step does not need to make room, exactly (tokens equal HuggingFace's);
an adapter that cannot fit is refused with a clear error, by the request check and by the workers, and the engine
keeps serving; a step that needs more than the budget is served beyond it, and what it placed there is counted and
given back at a later step that does not need it."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the engine tests need vllm (the cpu extra) installed")

from adapter_cases import make  # noqa: E402
from offline_engine import offline_engine  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from tenfold.engine.adapter_memory import ALIGNMENT, ENV  # noqa: E402
from test_adapter_memory import reservation  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

SLOTS = 3
NEW_TOKENS = 8
CASES = {"lora": 1, "miss": 2, "lorta_heads_out": 3, "bat": 4}  # name -> engine id


@pytest.fixture(scope="module")
def engine(tiny_model_dirs, specs, hf_models, tmp_path_factory):
    spec = specs["mha"]
    root = tmp_path_factory.mktemp("adapter-memory")
    adapters = {case: make(case, spec, seed=500 + i) for i, case in enumerate(CASES)}
    for case, adapter in adapters.items():
        save_adapter(adapter, root / case)
    sizes = {case: reservation(spec, SLOTS, adapter) for case, adapter in adapters.items()}
    # room for lora's and miss's buckets together; LoRTA's needs one of them gone; bat's never fits
    budget = sizes["lora"] + sizes["miss"] + ALIGNMENT
    assert sizes["lorta_heads_out"] > ALIGNMENT and sizes["bat"] > budget
    # insecure serialization: the test reads the workers' adapter memory ledger through a function sent to them
    env = {ENV: repr(budget / (1 << 30)), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    with offline_engine("native", env=env, model=str(tiny_model_dirs["mha"]),
                        dtype="float32", enable_lora=True, max_loras=SLOTS, max_lora_rank=16, max_cpu_loras=8,
                        max_model_len=128, max_num_seqs=4, seed=0, block_size=32, enforce_eager=True) as llm:
        yield {"llm": llm, "root": root, "adapters": adapters, "model": hf_models["mha"]}


def request(engine, case):
    from vllm.lora.request import LoRARequest

    return LoRARequest(case, CASES[case], str(engine["root"] / case)) if case else None


def check_batch(engine, cases, seed):
    from vllm import SamplingParams

    prompts = random_prompts(len(cases), seed=seed)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = engine["llm"].generate([{"prompt_token_ids": p} for p in prompts], params,
                                     lora_request=[request(engine, c) for c in cases], use_tqdm=False)
    for case, prompt, output in zip(cases, prompts, outputs):
        want, _ = greedy_reference(engine["model"], prompt, NEW_TOKENS, engine["adapters"][case] if case else None)
        assert list(output.outputs[0].token_ids) == want, f"{case or 'base'}: tokens differ from HuggingFace"


def test_adapters_beyond_the_budget_are_served_by_evicting_what_a_step_does_not_need(engine):
    check_batch(engine, [None, "lora", "miss"], seed=1)  # both buckets fit
    check_batch(engine, ["lorta_heads_out", None], seed=2)  # lora, least recently used, makes room
    check_batch(engine, ["lora", "lorta_heads_out", None], seed=3)  # now miss goes
    check_batch(engine, ["miss", "lora"], seed=4)


def test_an_adapter_that_cannot_fit_is_refused_and_the_engine_keeps_serving(engine):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with pytest.raises(Exception, match=r"adapter memory.*--adapter-memory"):  # the request check, up front
        engine["llm"].generate([{"prompt_token_ids": [5, 6, 7]}], params, lora_request=[request(engine, "bat")],
                               use_tqdm=False)
    with pytest.raises(Exception, match=r"adapter memory.*--adapter-memory"):  # the workers, for a direct load
        engine["llm"].llm_engine.add_lora(request(engine, "bat"))
    check_batch(engine, [None, "lora", "miss"], seed=5)


def ledger(engine) -> list[tuple[int, int]]:
    """Each worker's adapter memory beyond the budget: (bytes held there now, bytes ever placed there)."""
    def read(worker):  # runs in the worker (a local function: sent by value)
        memory = worker.model_runner.lora_manager._adapter_manager._tenfold_native.store.memory
        return memory.beyond, memory.beyond_total

    return engine["llm"].collective_rpc(read)


def test_a_step_beyond_the_budget_is_served_and_given_back_when_no_step_needs_it(engine):
    check_batch(engine, ["lora", "miss"], seed=6)  # both resident, within the budget
    [(held, placed_before)] = ledger(engine)
    assert held == 0
    check_batch(engine, ["lora", "miss", "lorta_heads_out"], seed=7)  # a step needs all three: LoRTA's beyond it
    [(_, placed)] = ledger(engine)
    assert placed > placed_before, "the step placed LoRTA's bucket beyond the budget"
    check_batch(engine, [None, "lora"], seed=8)  # a step that does not need LoRTA: its bucket moves in or goes
    assert [held for held, _ in ledger(engine)] == [0]
    check_batch(engine, ["lorta_heads_out", "miss"], seed=9)
