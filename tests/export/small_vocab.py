"""Small helpers for GGUF tests on tiny models: a byte-level BPE tokenizer trained on lee-news, token
windows of it, and llama.cpp's logits for a file. SmolLM2's own 49152-token vocabulary (whose export is
pinned in test_gguf.py) takes gguf-py ~4.5 s to parse per file, which tests writing many files cannot
afford."""

from __future__ import annotations

import torch
import transformers

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows


def small_bpe(vocab: int, texts: slice, *, split_digits: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A `vocab`-token byte-level BPE trained on lee-news evaluation `texts`; split_digits: one digit
    per token first, as SmolLM2's pre-tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if split_digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(load_data("lee-news", "eval").texts[texts], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def windows(tokenizer: transformers.PreTrainedTokenizerBase) -> torch.Tensor:
    """Two 64-token windows of the lee-news evaluation text: (2, 64)."""
    return lm_windows(tokenizer, load_data("lee-news", "eval").joined(), 64, max_windows=2)


def llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits (n, T, V) float64 for token windows `ids` (n, T <= 64), each from an empty
    cache; skips the test where llama_cpp is not installed."""
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2,
                          logits_all=True, n_gpu_layers=0, verbose=False)
    try:
        got = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            got.append(torch.from_numpy(llm.scores[: len(row)].copy()))
    finally:
        llm.close()
    return torch.stack(got).double()
