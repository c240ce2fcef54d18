"""Train an adapter of any family on a HuggingFace causal LM: the base stays frozen, only the factors learn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .attach import attach
from .base import Adapter


def tokenize_batches(tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 64) -> list[dict]:
    """Padded batches with labels (padding masked out of the loss)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def train(model, adapter: Adapter, batches: Sequence[dict], steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
          progress: bool = True) -> list[float]:
    """Run `steps` AdamW steps on the adapter's factors (cycling through `batches`); returns the loss per step.
    The model is left exactly as it was: the adapter is detached and requires_grad flags restored afterwards."""
    if not batches:
        raise ValueError("train() needs at least one batch")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    was_training = model.training
    losses: list[float] = []
    with attach(model, adapter):
        params = [p for p in adapter.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        bar = tqdm(range(steps), desc=f"training {adapter.family}", disable=not progress)
        try:
            for step in bar:
                batch = batches[step % len(batches)]
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            model.train(was_training)
            for p, flag in flags.items():
                p.requires_grad_(flag)
    return losses
