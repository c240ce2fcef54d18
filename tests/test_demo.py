"""`tenfold demo` in bounded time: its task data, its training and cache on the tiny model (a few steps: the real
demo trains SmolLM2-135M-Instruct for minutes), and the whole command end to end on the tiny model, checking that the
answers and examples come after the server is ready with the engine's log in a file, not on screen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tenfold.demo import ADAPTERS, prepare
from tenfold.demo_tasks import DEMO_QUESTION, HELD_OUT, STYLES, chat_batches, facts, training_facts

QUICK_STEPS = 6


def test_every_fact_renders_in_every_style():
    all_facts = facts()
    assert len({f.question for f in all_facts}) == len(all_facts) >= 80
    for fact in all_facts:
        assert json.loads(fact.render("json")).keys() == {"topic", "answer"}
        assert len(fact.render("word").split()) == 1
        assert fact.render("caps") == fact.render("caps").upper()
        assert fact.render("french") != fact.english
    with pytest.raises(ValueError, match="unknown demo answer style"):
        all_facts[0].render("pirate")
    assert {a.style for a in ADAPTERS} <= set(STYLES)


def test_held_out_questions_are_never_trained_on():
    questions = {f.question for f in facts()}
    trained = {f.question for f in training_facts()}
    assert DEMO_QUESTION in HELD_OUT and set(HELD_OUT) <= questions
    assert not trained & set(HELD_OUT) and trained | set(HELD_OUT) == questions


def test_chat_batches_put_the_loss_on_the_answer_only(tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["mha"])
    pairs = [("What is 2 plus 3?", "5."), ("What color is grass?", '{"topic": "colors", "answer": "Green"}')]
    batches = chat_batches(tokenizer, pairs, batch_size=2)
    assert len(batches) == 1
    batch = batches[0]
    for row, (question, answer) in enumerate(pairs):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == -100).all()
        learned = labels[labels != -100]
        assert tokenizer.decode(learned).startswith(answer)  # the answer and the end-of-turn token
        assert batch["attention_mask"][row].sum() == n_prompt + len(learned)


@pytest.fixture(scope="module")
def prepared(tiny_model_dirs, tmp_path_factory):
    import torch

    workdir = tmp_path_factory.mktemp("demo")
    messages = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from 2; on a loaded machine OpenMP's barriers stall 50x
    try:
        base, adapters = prepare(workdir, tiny_model_dirs["mha"], steps=QUICK_STEPS, progress=False,
                                 log=messages.append)
    finally:
        torch.set_num_threads(threads)
    return workdir, base, adapters, messages


def test_prepare_trains_every_family_and_saves_in_the_served_dtype(prepared):
    import torch

    from tenfold.adapters import load_adapter

    _, _, adapters, messages = prepared
    assert sum(m.startswith("training adapter") for m in messages) == len(ADAPTERS)
    families = set()
    for demo in ADAPTERS:
        adapter = load_adapter(adapters[demo.name])
        families.add(adapter.family)
        assert {t.dtype for t in adapter.tensors().values()} == {torch.bfloat16}
        losses = json.loads((adapters[demo.name] / "tenfold_demo.json").read_text())["losses"]
        assert losses["last"] < losses["first"], (demo.name, losses)
    assert families == {"lorta", "loretta_rep", "miss"}


def test_prepare_reuses_its_cache(prepared, tiny_model_dirs):
    workdir, base, adapters, _ = prepared
    stamps = {name: (path / "tenfold_demo.json").stat().st_mtime_ns for name, path in adapters.items()}
    messages = []
    assert prepare(workdir, tiny_model_dirs["mha"], steps=QUICK_STEPS, progress=False,
                   log=messages.append) == (base, adapters)
    assert all("cached" in m for m in messages) and len(messages) == len(ADAPTERS)
    assert {name: (path / "tenfold_demo.json").stat().st_mtime_ns for name, path in adapters.items()} == stamps


def test_demo_prints_answers_and_examples_once_ready_with_the_log_in_a_file(prepared, tiny_model_dirs):
    from serve_process import CPU_ENV, free_port

    workdir, _, _, _ = prepared
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "tenfold.cli", "demo", "--workdir", workdir, "--base", tiny_model_dirs["mha"],
         "--steps", str(QUICK_STEPS), "--port", str(port), "--grpc-port", "0", "--once",
         # the tiny model in fp32 and eager: the quickest start (the real demo serves bf16)
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"],
        env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=600)
    log = workdir / "serve.log"
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:],
                                    log.read_text()[-3000:] if log.is_file() else "")
    out = result.stdout
    assert f"engine log in {log.resolve()}" in out
    assert "Application startup complete" in log.read_text()  # vLLM's log went to the file...
    assert "INFO" not in out and "WARNING" not in out  # ...and not to the screen
    answers = out[out.index(f"Q: {DEMO_QUESTION}"):out.index("Try it yourself")]
    for name in ["base", *[a.name for a in ADAPTERS]]:
        assert f"\n  {name} " in answers, answers
    assert out.index("ready after") < out.index(f"Q: {DEMO_QUESTION}") < out.index("curl -s http://127.0.0.1")
    assert "from openai import OpenAI" in out and "/v1/chat/completions" in out
    assert "grpc" not in out.split("Try it yourself")[1]  # --grpc-port 0: no gRPC server, no gRPC example
