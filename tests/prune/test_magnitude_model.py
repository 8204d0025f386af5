"""Magnitude pruning: exact counts on a tiny layer, scope behaviour, and SmolLM2 perplexity."""

from __future__ import annotations

import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.evaluate.perplexity import perplexity
from slimformer.prune.magnitude import MagnitudeConfig, magnitude


def _tiny() -> torch.nn.Module:
    return tiny_llama(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)


def test_layer_scope_exact_counts() -> None:
    model = _tiny()
    info = magnitude(model, MagnitudeConfig(sparsity=0.5))
    assert info["layers"] == 14
    for name, sparsity in info["layer_sparsity"].items():
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    assert float(model.lm_head.weight.eq(0).float().mean()) == 0.0  # not a default target


def test_global_scope_differs_per_layer_but_same_total() -> None:
    model = _tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.01)  # one layer of tiny weights
    info = magnitude(model, MagnitudeConfig(sparsity=0.3, scope="global"))
    per_layer = info["layer_sparsity"]
    assert per_layer["model.layers.0.mlp.down_proj"] == 1.0  # all of its weights rank lowest
    assert min(per_layer.values()) < 0.3
    assert abs(info["sparsity"] - 0.3) < 1e-3


def test_threshold_mode() -> None:
    model = _tiny()
    info = magnitude(model, MagnitudeConfig(threshold=0.01, targets=("re:.*q_proj",)))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert info["layers"] == 2
    assert bool(((w == 0) | (w.abs() >= 0.01)).all()) and int((w == 0).sum()) > 0


def test_magnitude20_on_smollm_within_15pct(smollm, smollm_windows, smollm_fp32_ppl) -> None:
    info = magnitude(smollm.model, MagnitudeConfig(sparsity=0.2))
    assert abs(info["sparsity"] - 0.2) < 1e-4
    ppl = perplexity(smollm.model, smollm_windows, progress=False)["ppl"]
    assert ppl / smollm_fp32_ppl < 1.15
