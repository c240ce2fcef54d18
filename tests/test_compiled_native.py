"""The native path in a compiled engine (issue 17): vLLM's CPU compilation (inductor, traced once) stays on in native
mode with LoRA enabled, and the compiled model serves every family exactly, in fp32 and bf16, while the batch's
adapter mix changes from step to step (the step's adapters live outside the traced graph: `compiled_ops.py`).

References are HuggingFace forwards in fp32 with each adapter attached (`vllm_reference`). fp32: greedy tokens
identical and log-probabilities within the plugin suite's bound. bf16: teacher-forced on the fp32 reference's greedy
continuation, every position's log-probability of the reference token within BF16_LOGPROB_BOUND of the fp32 value,
and that token vLLM's own top choice unless the two are within that bound of each other (a near-tie bf16 may break
either way). The bound: bf16 keeps 8 significant bits, so each weight, activation and KV entry carries a relative
rounding error of up to 2^-9, which through 3 layers moves log-probabilities by about 1e-2: the worst measured
here was 0.020 (a base row; adapters 0.016), over both models and every family, so 0.05 leaves a margin of 2.5x.
So that a dropped update cannot pass, each adapter's result must also be at least twice as far from the base
model's log-probabilities (on the same tokens) as from its adapter's (measured: 0.18-2.2 from the base).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the compiled engine tests need vllm (the cpu extra) installed")

from adapter_cases import make  # noqa: E402
from offline_engine import offline_engine  # noqa: E402
from tenfold.adapters import save_adapter  # noqa: E402
from vllm_reference import greedy_reference, random_prompts  # noqa: E402

NEW_TOKENS = 12
FP32_LOGPROB_BOUND = 5e-5  # as tests/test_vllm_plugin.py
BF16_LOGPROB_BOUND = 0.05
CASES = ["lora", "lorta_heads_in", "lorta_heads_out", "lorta_qv", "loretta_rep", "loretta_adp", "miss", "miss_mini",
         "bat"]


@pytest.fixture(scope="module", params=["mha-float32", "gqa-float32", "mha-bfloat16", "gqa-bfloat16"])
def compiled(request, tiny_model_dirs, specs, hf_models, tmp_path_factory):
    """One compiled native engine per tiny model and dtype, with one adapter of every family."""
    name, dtype = request.param.split("-")
    root = tmp_path_factory.mktemp(f"compiled-{name}-{dtype}")
    adapters = {}
    for i, case in enumerate(CASES):
        adapters[case] = make(case, specs[name], seed=300 + i)
        save_adapter(adapters[case], root / case)
    with offline_engine("native", model=str(tiny_model_dirs[name]), dtype=dtype, enable_lora=True,
                        max_loras=len(CASES), max_lora_rank=32, max_cpu_loras=len(CASES), max_model_len=256,
                        max_num_seqs=6, seed=0, block_size=32, enforce_eager=False) as llm:
        yield {"name": name, "dtype": dtype, "llm": llm, "root": root, "adapters": adapters,
               "model": hf_models[name]}

def lora_request(compiled, case):
    from vllm.lora.request import LoRARequest

    return LoRARequest(case, CASES.index(case) + 1, str(compiled["root"] / case)) if case else None


def test_the_engine_runs_compiled_with_lora_enabled(compiled):
    from vllm.config import CompilationMode

    config = compiled["llm"].llm_engine.vllm_config
    assert config.lora_config is not None
    assert config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE, "native mode must keep compilation"
    assert config.compilation_config.backend == "inductor"


def test_changing_mixed_family_batches_match_huggingface(compiled):
    """Every family and base rows, more requests than the engine runs at once (max_num_seqs=6) and of different
    lengths: requests join and leave, so the adapter mix changes from step to step; no stale plan may survive."""
    from vllm import SamplingParams

    cases = [None, *CASES, None, "lora", "bat", None]
    prompts = random_prompts(len(cases), seed=31)
    lengths = [NEW_TOKENS - (i % 4) * 2 for i in range(len(cases))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in lengths]
    outputs = compiled["llm"].generate([{"prompt_token_ids": p} for p in prompts], params,
                                       lora_request=[lora_request(compiled, c) for c in cases], use_tqdm=False)
    references = [greedy_reference(compiled["model"], p, n, compiled["adapters"][c] if c else None)
                  for p, n, c in zip(prompts, lengths, cases)]
    if compiled["dtype"] == "float32":
        for case, output, (ref_tokens, ref_logprobs) in zip(cases, outputs, references):
            tokens = list(output.outputs[0].token_ids)
            assert tokens == ref_tokens, f"{compiled['name']} {case or 'base'}: greedy tokens differ from HuggingFace"
            logprobs = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, tokens)]
            worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs))
            assert worst <= FP32_LOGPROB_BOUND, f"{compiled['name']} {case or 'base'}: logprob differs by {worst}"
    else:
        check_bf16_teacher_forced(compiled, prompts, cases, references)


def check_bf16_teacher_forced(compiled, prompts, cases, references):
    from vllm import SamplingParams

    forced = [p + ref[:-1] for p, (ref, _) in zip(prompts, references)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outputs = compiled["llm"].generate([{"prompt_token_ids": f} for f in forced], params,
                                       lora_request=[lora_request(compiled, c) for c in cases], use_tqdm=False)
    for prompt, case, output, (ref_tokens, ref_logprobs) in zip(prompts, cases, outputs, references):
        label = f"{compiled['name']} bf16 {case or 'base'}"
        positions = output.prompt_logprobs[len(prompt): len(prompt) + len(ref_tokens) - 1]
        # prompt_logprobs[i]: token i given the tokens before it, so positions[k] scores the reference's token k
        got = [pos[t].logprob for pos, t in zip(positions, ref_tokens)]
        worst = max(abs(a - b) for a, b in zip(got, ref_logprobs))
        assert worst <= BF16_LOGPROB_BOUND, f"{label}: teacher-forced logprob differs by {worst:.4f} from fp32 HF"
        for pos, t in zip(positions, ref_tokens):
            top = max(lp.logprob for lp in pos.values())
            assert pos[t].logprob >= top - BF16_LOGPROB_BOUND, f"{label}: greedy choice differs beyond a near-tie"
        if case is not None:  # the adapter's effect must be resolved: vLLM is far closer to it than to the base
            base = base_logprobs(compiled["model"], prompt, ref_tokens[:-1])
            moved = max(abs(a - b) for a, b in zip(got, base))
            assert moved > 2 * worst, f"{label}: {worst:.4f} from the adapter's reference, {moved:.4f} from the base"


def base_logprobs(model, prompt, tokens):
    """The base model's fp32 log-probabilities of `tokens` after `prompt`, teacher-forced (one HF forward)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(tokens)]


def test_native_compilation_settings_per_device():
    """On CPU native mode undoes vLLM's LoRA-means-eager override (and nothing else: eager asked for stays eager);
    on a GPU it refuses graph capture with a clear error until the device-side plan exists."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode

    from tenfold.engine.patches.compilation import NativeModeNeedsEagerError, native_compilation

    def config(mode, enforce_eager):
        return SimpleNamespace(compilation_config=SimpleNamespace(mode=mode),
                               model_config=SimpleNamespace(enforce_eager=enforce_eager))

    compiled = config(CompilationMode.NONE, False)  # after vLLM's CPU platform forced NONE for LoRA
    native_compilation(compiled, CompilationMode.VLLM_COMPILE, on_cpu=True, device_name="cpu")
    assert compiled.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    eager = config(CompilationMode.NONE, True)
    native_compilation(eager, CompilationMode.NONE, on_cpu=True, device_name="cpu")
    assert eager.compilation_config.mode == CompilationMode.NONE
    with pytest.raises(NativeModeNeedsEagerError, match="--enforce-eager"):
        native_compilation(config(CompilationMode.VLLM_COMPILE, False), CompilationMode.VLLM_COMPILE, on_cpu=False,
                           device_name="cuda")
    native_compilation(config(CompilationMode.NONE, True), CompilationMode.NONE, on_cpu=False, device_name="cuda")
