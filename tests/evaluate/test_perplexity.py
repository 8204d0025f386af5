"""Perplexity agrees with Hugging Face's own `labels=` loss and does not depend on batch size."""

import math

import pytest
import torch
from tiny import tiny_llama as make_tiny_llama  # tests/tiny.py

from slimformer.errors import UserError
from slimformer.evaluate.perplexity import perplexity


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_llama(vocab_size=50, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=2048)


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (5, 12), generator=g)


def test_matches_hf_loss(tiny_llama, windows):
    out = perplexity(tiny_llama, windows, batch_size=2, progress=False)
    assert out["windows"] == 5 and out["tokens"] == 5 * 11
    with torch.no_grad():
        losses = [float(tiny_llama(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # every window predicts the same 11 tokens
    assert out["ppl"] == pytest.approx(expected, rel=1e-4)
    assert out["nll_sum"] == pytest.approx(sum(losses) * 11, rel=1e-4)
    assert 20 < out["ppl"] < 100  # a random 50-token model is close to uniform (ppl 50)


def test_batch_size_invariant(tiny_llama, windows):
    a = perplexity(tiny_llama, windows, batch_size=1, progress=False)
    b = perplexity(tiny_llama, windows, batch_size=3, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert a["tokens"] == b["tokens"] == 55


def test_bad_windows(tiny_llama):
    with pytest.raises(UserError, match="shape"):
        perplexity(tiny_llama, torch.zeros(3, dtype=torch.long), progress=False)
