"""Tiny random-weight Llama models with an in-process BPE tokenizer, for tests and the offline demo.

No weights can be downloaded here, so tests build real architectures themselves: a byte-level BPE tokenizer trained
on a text file, and a LlamaForCausalLM with random weights (head_dim 64: vLLM's CPU attention rejects smaller heads).
Builds are cached on disk, keyed by every setting and the corpus's hash, so a test session builds each model once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP = "tenfold_tiny_llama.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaConfig:
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    num_layers: int = 3
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 512
    initializer_range: float = 0.04  # above Llama's 0.02 so greedy tokens are decisive, yet fp32 logits stay small
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def train_tokenizer(corpus: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(out_dir, corpus_path, config: TinyLlamaConfig = TinyLlamaConfig()) -> Path:
    """Build (or reuse the cached) tiny model in `out_dir`; returns the directory, loadable by transformers and vLLM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    corpus = Path(corpus_path).read_text()
    key = {"config": asdict(config), "corpus_sha256": hashlib.sha256(corpus.encode()).hexdigest()}
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return out
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = train_tokenizer(corpus, config.vocab_size)
    tokenizer.save_pretrained(tmp)
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(hf_config)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / STAMP).write_text(json.dumps(key))
    tmp.rename(out)  # atomic: a half-built model is never mistaken for a cached one
    return out
