"""Structured pruning on the real MiniLM-L6: exact parameter counts and embedding fidelity."""

from __future__ import annotations

import copy

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.evaluate.embedding import embed, mean_cosine
from slimformer.models.loading import ModelBundle
from slimformer.models.structure import block_parts
from slimformer.prune.structured import HeadsConfig, NeuronsConfig, heads, neurons


def test_minilm_heads_and_neurons_quarter(minilm_bundle: ModelBundle) -> None:
    model = copy.deepcopy(minilm_bundle.model)
    ctx = StepContext(tokenizer=minilm_bundle.tokenizer, kind="encoder", calib=load_data("tweets", "calib"), progress=False)
    h = heads(model, HeadsConfig(sparsity=0.25, score="magnitude"))
    n = neurons(model, NeuronsConfig(sparsity=0.25, score="activation", num_samples=4, seq_len=128), ctx)
    hidden, d = 384, 32
    assert h["heads_removed"] == 18  # 3 of 12 heads in each of 6 layers
    assert h["params_before"] - h["params_after"] == 18 * (3 * d * (hidden + 1) + d * hidden)
    assert n["params_before"] - n["params_after"] == 6 * 384 * (hidden + 1 + hidden)  # 1536 -> 1152 per layer
    assert [p.sizes() for p in block_parts(model)] == [{"heads": 9, "kv_heads": 9, "intermediate": 1152}] * 6
    texts = list(load_data("tweets", "eval").texts[:128])
    cosine = mean_cosine(embed(model, minilm_bundle.tokenizer, texts), embed(minilm_bundle.model, minilm_bundle.tokenizer, texts))
    assert cosine > 0.72  # measured 0.78 before any recovery (docs/pruning.md)
