"""HuggingFace reference decoding for comparing vLLM outputs: greedy tokens and their log-probabilities (fp32)."""

from __future__ import annotations

import torch

from tenfold.adapters import attach


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], new_tokens: int, adapter=None) -> tuple[list[int], list[float]]:
    """Greedy decoding by full forward passes (no generation config, no EOS handling): the exact reference."""
    ids = list(prompt_ids)
    tokens, logprobs = [], []
    attachment = attach(model, adapter) if adapter is not None else None
    try:
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logits))
            tokens.append(token)
            logprobs.append(float(log_probs[token]))
            ids.append(token)
    finally:
        if attachment is not None:
            attachment.detach()
    return tokens, logprobs


def random_prompts(count: int, seed: int, low: int = 3, high: int = 500, min_len: int = 5, max_len: int = 20):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]
