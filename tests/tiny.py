"""Shared tiny fixtures for tests that need no real model: a random Llama of any small shape, a
character tokenizer, and a step context over synthetic calibration text."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from slimformer.context import StepContext
from slimformer.data.sources import TextData

LLAMA = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_llama(seed: int | None = 0, **config: Any) -> transformers.LlamaForCausalLM:
    """A random LlamaForCausalLM in eval mode: `LLAMA` with `config` keys overriding it. The weights
    come from torch.manual_seed(seed); seed=None draws them from the current random state."""
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **config})).eval()


class CharTokenizer:
    """One id per character, `first + ord(c) % (vocab - first)`, no BOS: enough for calibration windows."""

    bos_token_id = None

    def __init__(self, vocab: int = 64, first: int = 0) -> None:
        self.vocab, self.first = vocab, first

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = False) -> dict:
        return {"input_ids": [self.first + ord(c) % (self.vocab - self.first) for c in text]}


def tiny_ctx(text: str, kind: str = "decoder", tokenizer: Any = None) -> StepContext:
    """A StepContext calibrating on `text` (one synthetic document) with a CharTokenizer by default."""
    return StepContext(tokenizer=tokenizer or CharTokenizer(), kind=kind, calib=TextData("synthetic", (text,)),
                       progress=False)
