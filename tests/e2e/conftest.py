"""Tiny local Hugging Face folders of several families (real tokenizers, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm_bundle, minilm_bundle) -> dict[str, Path]:
    """{family: folder} for a tiny Llama, GPT-2 (Conv1D layers) and BERT."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    vocab = smollm_bundle.model.config.vocab_size
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=1024))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=minilm_bundle.model.config.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512))
    return {
        "llama": _save(llama, smollm_bundle.tokenizer, root / "llama"),
        "gpt2": _save(gpt2, smollm_bundle.tokenizer, root / "gpt2"),
        "bert": _save(bert, minilm_bundle.tokenizer, root / "bert"),
    }


@pytest.fixture
def artifact(tmp_path, tiny_dirs) -> Path:
    """A slimformer artifact of the tiny Llama (float weights), written with its tokenizer."""
    from slimformer.artifact import save_artifact

    folder = tmp_path / "art"
    folder.mkdir()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    save_artifact(model, folder, kind="decoder", tokenizer=tokenizer)
    return folder
