"""Distribution stats: kurtosis of a normal is 3, outlier channels show up in the channel ratio,
and a tiny Llama gets stats for every linear layer plus a histogram PNG."""

from __future__ import annotations

import pytest
import torch

from slimformer.evaluate.distribution import distribution_report, layer_distributions, plot_distributions, tensor_stats


def test_tensor_stats_on_known_distributions() -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 64)
    s = tensor_stats(x)
    assert s["kurtosis"] == pytest.approx(3.0, abs=0.1)
    assert s["std"] == pytest.approx(1.0, abs=0.02)
    assert s["outlier_ratio"] == 0.0 and s["channel_ratio"] < 1.5
    x[:10, 5] = 100.0  # one outlier channel, 10 values
    s = tensor_stats(x)
    assert s["absmax"] == 100.0 and s["channel_ratio"] > 20
    assert s["outlier_ratio"] == pytest.approx(10 / x.numel()) and s["kurtosis"] > 50


def test_layer_distributions_on_a_tiny_llama(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    keep = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
    stats, samples = layer_distributions(model, torch.randint(0, 64, (2, 16)), keep=keep)
    assert len(stats) == 2 * 7 and all("activation" in s for s in stats.values())
    down = stats["model.layers.1.mlp.down_proj"]
    assert down["weight"]["absmax"] == pytest.approx(float(model.model.layers[1].mlp.down_proj.weight.abs().max()))
    assert samples.keys() == set(keep) and samples[keep[0]]["activation"].numel() == 2 * 16 * 32
    plot_distributions(samples, stats, tmp_path / "distribution.png")
    assert (tmp_path / "distribution.png").stat().st_size > 10_000
    assert distribution_report(stats).count("\n") == 2 * 7 + 1
