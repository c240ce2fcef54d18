"""Shared fixtures: the tiny test models (built once, cached on disk) and their specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tenfold.tiny_llama import TinyLlamaConfig, build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
CACHE = Path(os.environ.get("TENFOLD_TEST_CACHE", REPO / ".tenfold-cache"))

TINY_MODELS = {
    "mha": TinyLlamaConfig(num_heads=4, num_kv_heads=4),  # multi-head: num_kv_heads == num_heads
    "gqa": TinyLlamaConfig(num_heads=4, num_kv_heads=2, seed=1),  # grouped-query: 2 query heads per kv head
}


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    return {name: build_tiny_llama(CACHE / f"tiny-llama-{name}", CORPUS, cfg) for name, cfg in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    """The tiny models loaded once in fp32, eval mode; tests must leave them unchanged (attach then detach)."""
    import torch
    from transformers import AutoModelForCausalLM

    models = {}
    for name, path in tiny_model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        models[name] = model
    return models


@pytest.fixture(scope="session")
def specs(hf_models):
    from tenfold.adapters import ModelSpec

    return {name: ModelSpec.from_hf_config(model.config) for name, model in hf_models.items()}


@pytest.fixture(params=sorted(TINY_MODELS))
def model_name(request) -> str:
    return request.param
