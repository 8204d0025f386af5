"""A tiny random Llama (weights of std 0.2, so its next-token distributions are far from uniform) with a 128-symbol byte tokenizer, and a step context on real text, for QAT tests."""

from __future__ import annotations

import transformers
from tiny import tiny_llama as shared_llama  # tests/tiny.py

from slimformer.context import StepContext
from slimformer.data.sources import load_data

VOCAB = 128


class ByteTokenizer:
    """Each UTF-8 byte (mod 128) is a token; no special tokens. Enough for `lm_windows`."""

    bos_token_id = None

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [b % VOCAB for b in text.encode("utf-8")]}


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    # sharper logits than the default initializer_range 0.02
    return shared_llama(seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=128,
                        initializer_range=0.2)


def tiny_ctx() -> StepContext:
    """lee-news calibration text, byte-tokenized."""
    return StepContext(tokenizer=ByteTokenizer(), calib=load_data("lee-news", "calib"), progress=False)
