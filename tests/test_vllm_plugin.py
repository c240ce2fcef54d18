"""The vLLM plugin in both execution modes: native (every family, tenfold's own wrappers and slot store) and convert
(every exactly-low-rank family on vLLM's LoRA kernels). Mixed with base rows in one batch, every answer equals the
HuggingFace reference; bad adapters fail alone."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (the cpu extra) installed")

from adapter_cases import make  # noqa: E402
from offline_engine import offline_engine  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

NEW_TOKENS = 24
MAX_LORAS = 12
# convert mode: every family with an exact LoRA form, both LoRTA orientations; native mode: every family
CONVERTIBLE_CASES = ["lora", "lorta_heads_in", "lorta_heads_out", "loretta_rep", "miss", "miss_mini"]
SERVED_CASES = {"convert": CONVERTIBLE_CASES, "native": [*CONVERTIBLE_CASES, "lorta_qv", "bat", "loretta_adp"]}


def engine_args(model_dir):
    return dict(model=str(model_dir), dtype="float32", enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=32,
                max_cpu_loras=MAX_LORAS * 2, max_model_len=256, max_num_seqs=32, enforce_eager=True, seed=0,
                enable_prefix_caching=True, block_size=32)


@pytest.fixture(scope="module", params=["native-mha", "native-gqa", "convert-mha", "convert-gqa"])
def served(request, tiny_model_dirs, specs, hf_models, tmp_path_factory):
    """One engine per execution mode and tiny model, shared by the tests of this module, plus the adapters saved
    for it. The mode is read from TENFOLD_MODE by the engine's processes and by this process's request checks."""
    mode, name = request.param.split("-")
    root = tmp_path_factory.mktemp(f"adapters-{name}")
    adapters = {}
    for i, case in enumerate(SERVED_CASES[mode]):
        adapter = make(case, specs[name], seed=100 + i)
        adapter.validate(specs[name])
        save_adapter(adapter, root / case)
        adapters[case] = adapter
    with offline_engine(mode, **engine_args(tiny_model_dirs[name])) as llm:
        yield {"name": name, "mode": mode, "llm": llm, "root": root, "adapters": adapters, "model": hf_models[name]}

def lora_request(served, case):
    from vllm.lora.request import LoRARequest

    index = SERVED_CASES[served["mode"]].index(case)
    return LoRARequest(lora_name=case, lora_int_id=index + 1, lora_path=str(served["root"] / case))


def generate(llm, prompts, requests):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                           o.outputs[0].token_ids)]) for o in outputs]


def check_against_reference(served, prompts, cases, outputs):
    for prompt, case, (tokens, logprobs) in zip(prompts, cases, outputs):
        adapter = served["adapters"][case] if case else None
        ref_tokens, ref_logprobs = greedy_reference(served["model"], prompt, NEW_TOKENS, adapter)
        assert tokens == ref_tokens, f"{served['name']} {case or 'base'}: greedy tokens differ from HuggingFace"
        worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
        assert worst <= 5e-5, f"{served['name']} {case or 'base'}: logprob differs by {worst}"


def test_mixed_family_batch_matches_huggingface(served):
    """Base rows, every family of the mode and both LoRTA orientations in one batch."""
    cases = [None, *SERVED_CASES[served["mode"]], None, "lora", "miss_mini", None]
    prompts = random_prompts(len(cases), seed=7)
    requests = [lora_request(served, c) if c else None for c in cases]
    outputs = generate(served["llm"], prompts, requests)
    check_against_reference(served, prompts, cases, outputs)


def test_base_rows_untouched_when_every_slot_is_occupied(served, specs, tmp_path):
    """vLLM 0.32's CPU ops gather slot -1 as the last slot: with all slots holding adapters, base rows would get
    the last slot's update. The plugin's fix keeps them exactly the base model."""
    root = tmp_path / "slots"
    adapters = {}
    for i in range(MAX_LORAS):
        adapter = make("lora", specs[served["name"]], seed=500 + i)
        save_adapter(adapter, root / f"fill{i}")
        adapters[f"fill{i}"] = adapter
    names = list(adapters)
    cases = names + [None, None, None]
    prompts = random_prompts(len(cases), seed=8)
    from vllm.lora.request import LoRARequest

    requests = [LoRARequest(n, 1000 + i, str(root / n)) if n else None for i, n in enumerate(cases)]
    outputs = generate(served["llm"], prompts, requests)
    served = {**served, "adapters": {**served["adapters"], **adapters}}
    check_against_reference(served, prompts, cases, outputs)


def test_bad_adapters_fail_alone_and_the_engine_keeps_serving(served, specs, tmp_path):
    """Wrong-model, partial and missing adapters (and in convert mode the families with no LoRA form) each fail
    with a clear error; then a good batch still completes in the same engine."""
    from vllm.lora.request import LoRARequest

    from tenfold.adapters import ModelSpec

    other = ModelSpec(num_layers=3, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1024)
    save_adapter(make("lora", other, seed=1), tmp_path / "wrong_model")
    partial = make("lora", specs[served["name"]], seed=2)
    del partial._factors["layers:1:v_proj:lora_A"], partial._factors["layers:1:v_proj:lora_B"]
    partial._targets = [k for k in partial._targets if k != (1, "v_proj")]
    save_adapter(partial, tmp_path / "partial")
    save_adapter(make("bat", specs[served["name"]], seed=3), tmp_path / "bat")
    save_adapter(make("loretta_adp", specs[served["name"]], seed=4), tmp_path / "loretta_adp")

    expected = {"wrong_model": "expected shape", "partial": "only part of the targeted modules",
                "missing": "does not exist"}
    if served["mode"] == "convert":
        expected.update(bat="native path", loretta_adp="native path")
    prompt = random_prompts(1, seed=9)
    for i, (name, message) in enumerate(expected.items()):
        request = LoRARequest(name, 2000 + i, str(tmp_path / name))
        with pytest.raises(Exception, match=message):
            generate(served["llm"], prompt, [request])
    # a failed explicit load (engine core -> worker) is an error too, not a dead engine
    with pytest.raises(Exception, match="expected shape"):
        served["llm"].llm_engine.add_lora(LoRARequest("wrong_model_load", 2100, str(tmp_path / "wrong_model")))

    cases = [None, "lorta_heads_out", "miss"]
    prompts = random_prompts(len(cases), seed=10)
    requests = [lora_request(served, c) if c else None for c in cases]
    check_against_reference(served, prompts, cases, generate(served["llm"], prompts, requests))


def test_prefix_cache_is_per_adapter_and_per_version(served, specs, tmp_path):
    """The same long prompt for the base model and two adapters, then for an adapter rewritten in place under the
    same name, path and id: every answer equals its own reference (no KV reused across adapters or versions)."""
    from vllm.lora.request import LoRARequest

    prompt = random_prompts(1, seed=11, min_len=70, max_len=70)[0]  # several full KV blocks
    first, second = make("lorta_heads_out", specs[served["name"]], seed=31), make("miss", specs[served["name"]], seed=32)
    save_adapter(first, tmp_path / "first")
    save_adapter(second, tmp_path / "second")
    order = [(None, None), ("first", first), ("second", second), (None, None), ("first", first)]
    for name, adapter in order:
        request = LoRARequest(name, 3000 + ["first", "second"].index(name), str(tmp_path / name)) if name else None
        [(tokens, _)] = generate(served["llm"], [prompt], [request])
        assert tokens == greedy_reference(served["model"], prompt, NEW_TOKENS, adapter)[0], name or "base"

    import shutil

    replacement = make("lorta_heads_out", specs[served["name"]], seed=33)
    shutil.rmtree(tmp_path / "first")
    save_adapter(replacement, tmp_path / "first")
    [(tokens, _)] = generate(served["llm"], [prompt], [LoRARequest("first", 3000, str(tmp_path / "first"))])
    assert tokens == greedy_reference(served["model"], prompt, NEW_TOKENS, replacement)[0], "reloaded adapter"


def test_official_layouts_are_served(served, specs, tmp_path):
    """Checkpoints in their producers' own layouts (LoRTA fork, pickled LoRETTA rep, legacy Bone) work as vLLM LoRA
    paths without conversion on disk."""
    import official_layouts as layouts
    from vllm.lora.request import LoRARequest

    spec = specs[served["name"]]
    adapters = {"fork": make("lorta_heads_in", spec, seed=71), "rep": make("loretta_rep", spec, seed=72),
                "bone": make("miss", spec, seed=73)}
    for adapter in adapters.values():
        adapter.validate(spec)
    layouts.lorta_fork(adapters["fork"], tmp_path / "fork")
    layouts.loretta_rep(adapters["rep"], tmp_path / "rep")
    layouts.bone_legacy(adapters["bone"], tmp_path / "bone")
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in tmp_path.iterdir()}
    cases = ["fork", None, "rep", "bone"]
    prompts = random_prompts(len(cases), seed=12)
    requests = [LoRARequest(c, 4000 + i, str(tmp_path / c)) if c else None for i, c in enumerate(cases)]
    outputs = generate(served["llm"], prompts, requests)
    check_against_reference({**served, "adapters": adapters}, prompts, cases, outputs)
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in tmp_path.iterdir()} == before, "nothing written"


def run_to_completion(llm, submissions):
    """Add (prompt, LoRARequest) pairs straight to the engine, call `between()` hooks, step until all finish;
    returns the greedy tokens per prompt (tuple)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine = llm.llm_engine
    for i, (prompt, request, between) in enumerate(submissions):
        engine.add_request(f"lifecycle-{i}-{id(prompt)}", {"prompt_token_ids": prompt}, params, lora_request=request)
        if between is not None:
            between()
    tokens = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[tuple(output.prompt_token_ids)] = list(output.outputs[0].token_ids)
    return tokens


def test_requests_finish_on_their_version_through_rewrite_delete_and_remove(served, specs, tmp_path):
    """Offline API: a request admitted before its adapter is rewritten keeps the old weights while a request
    admitted after it gets the new ones (two versions of one name in one batch: vLLM 0.32 collapsed them by name and
    its worker died with KeyError); then the files are deleted and the adapter removed while its last request still
    runs: it finishes exactly, a new request for the deleted path fails alone, and the engine keeps serving."""
    import shutil

    from vllm.lora.request import LoRARequest

    spec = specs[served["name"]]
    old, new = make("miss", spec, seed=41), make("miss", spec, seed=42)
    path = tmp_path / "swap"
    save_adapter(old, path)
    request = LoRARequest("swap", 5000, str(path))
    first, second, third = random_prompts(3, seed=43)

    def rewrite():
        shutil.rmtree(path)
        save_adapter(new, path)

    def delete_and_remove():
        shutil.rmtree(path)
        assert served["llm"].llm_engine.remove_lora(5000)

    tokens = run_to_completion(served["llm"], [(first, request, rewrite), (second, request, None),
                                               (third, request, delete_and_remove)])
    assert tokens[tuple(first)] == greedy_reference(served["model"], first, NEW_TOKENS, old)[0], "old version"
    assert tokens[tuple(second)] == greedy_reference(served["model"], second, NEW_TOKENS, new)[0], "new version"
    assert tokens[tuple(third)] == greedy_reference(served["model"], third, NEW_TOKENS, new)[0], "after removal"
    with pytest.raises(Exception, match="does not exist"):
        generate(served["llm"], [first], [LoRARequest("swap", 5001, str(path))])
    versions = served["llm"].llm_engine._tenfold_versions
    assert not any(v.user_id in (5000, 5001) for v in versions._versions.values()), "removed versions were freed"
    assert 5000 not in served["llm"].llm_engine.list_loras()
    cases = [None, "miss"]
    prompts = random_prompts(len(cases), seed=44)
    check_against_reference(served, prompts, cases,
                            generate(served["llm"], prompts, [lora_request(served, c) if c else None for c in cases]))
