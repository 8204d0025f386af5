"""A tiny random Llama and random token windows for training tests (no real model needed)."""

from __future__ import annotations

import torch
import transformers

from slimformer.train.data import TrainData


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_windows(n: int = 16, seq_len: int = 12, seed: int = 1) -> TrainData:
    gen = torch.Generator().manual_seed(seed)
    return TrainData({"input_ids": torch.randint(0, 64, (n, seq_len), generator=gen)})
