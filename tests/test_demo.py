"""`tenfold demo`'s preparation: the embedded base model and three adapters of different families, each trained to
a visibly different behaviour (checked with HuggingFace greedy decoding on prompts it was not trained on)."""

from __future__ import annotations

import pytest
import torch

from tenfold.adapters import load_adapter, attach
from tenfold.demo import ADAPTERS, prepare

UNSEEN_PROMPTS = ["Servers answer questions:", "The old lighthouse:"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("demo"))


def greedy_text(model, tokenizer, prompt, adapter=None, n=8):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if adapter is None:
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        else:
            with attach(model, adapter):
                out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:]).strip()


def test_adapters_have_their_own_behaviour(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dirs = demo
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    families = set()
    for prompt in UNSEEN_PROMPTS:
        base_text = greedy_text(model, tokenizer, prompt)
        for demo_adapter in ADAPTERS:
            adapter = load_adapter(adapter_dirs[demo_adapter.name])
            families.add(adapter.family)
            text = greedy_text(model, tokenizer, prompt, adapter)
            first_words = " ".join(demo_adapter.answer.split()[:2])
            assert text.startswith(first_words), (demo_adapter.name, prompt, text)
            assert not base_text.startswith(first_words)
    assert families == {"lorta", "loretta_rep", "miss"}


def test_prepare_is_cached(demo, tmp_path):
    base_dir, adapter_dirs = demo
    stamp = base_dir.parent / "demo.json"
    mtime = stamp.stat().st_mtime_ns
    assert prepare(base_dir.parent) == demo and stamp.stat().st_mtime_ns == mtime
