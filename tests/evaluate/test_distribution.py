"""Distribution stats: exact values on hand-computed tensors, kurtosis of a normal is 3, outlier
channels show up in the channel ratio, padding is left out, a tiny Llama gets stats for every linear
layer plus a histogram PNG, and the report section lists them."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.evaluate.distribution import (
    compare_distributions, distribution_report, histogram, layer_distributions, notable_layers, plot_distributions,
    tensor_stats,
)
from slimformer.evaluate.report import distribution_section


def _tiny_llama():
    return tiny_llama(hidden_size=32, intermediate_size=64)


def test_tensor_stats_exact_values() -> None:
    # values 1 -2 3 0 -1 2: mean 0.5, centred squares sum 17.5, fourth powers sum 88.375
    s = tensor_stats(torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 2.0]]))  # (rows 3, channels 2)
    assert s["absmax"] == 3.0
    assert s["std"] == pytest.approx((17.5 / 6) ** 0.5, rel=1e-12)  # every step exact in fp32
    assert s["kurtosis"] == pytest.approx((88.375 / 6) / (17.5 / 6) ** 2, rel=1e-12)  # 1.7314
    assert s["outlier_ratio"] == 0.0
    assert s["channel_ratio"] == 1.5  # channel absmax 3 and 2; torch's median of two is the lower one


def test_histogram_counts_every_value() -> None:
    counts, edges = histogram(torch.tensor([[0.0, 1.0], [1.0, 4.0]]), bins=4)  # bins of width 1 over [0, 4]
    assert counts.tolist() == [1.0, 2.0, 0.0, 1.0] and edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_tensor_stats_single_spike() -> None:
    # one 1 among 42 values (p = 1/42): kurtosis ((1-p)^3 + p^3) / (p (1-p)) = 40 + 1/41; 1 > 6 std
    x = torch.zeros(6, 7)
    x[0, 0] = 1.0
    s = tensor_stats(x)
    assert s["kurtosis"] == pytest.approx(40 + 1 / 41, rel=1e-6)  # the mean 1/42 is rounded to fp32
    assert s["outlier_ratio"] == 1 / 42
    assert s["channel_ratio"] == float("inf")  # the median channel is all zeros
    assert tensor_stats(torch.zeros(3, 4))["kurtosis"] == 0.0


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
    model = _tiny_llama()
    keep = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
    stats, hists = layer_distributions(model, torch.randint(0, 64, (2, 16)), keep=keep)
    assert len(stats) == 2 * 7 and all("activation" in s for s in stats.values())
    down = stats["model.layers.1.mlp.down_proj"]
    weight = model.model.layers[1].mlp.down_proj.weight.detach()
    assert down["weight"]["absmax"] == pytest.approx(float(weight.abs().max()))
    q, k = stats["model.layers.0.self_attn.q_proj"], stats["model.layers.0.self_attn.k_proj"]
    assert q["activation"] == k["activation"] and q["activation"] is not k["activation"]  # one input, taken once
    assert hists.keys() == set(keep)
    counts, edges = hists[keep[0]]["activation"]
    assert counts.shape == (200,) and edges.shape == (201,) and counts.sum() == 2 * 16 * 32  # every value
    plot_distributions({"fp32": (hists, stats)}, tmp_path / "distribution.png")
    assert (tmp_path / "distribution.png").stat().st_size > 10_000
    assert distribution_report(stats).count("\n") == 2 * 7 + 1


def test_padding_is_left_out_of_activation_stats() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 16))
    mask = torch.zeros_like(ids)
    mask[:, :10] = 1  # right padding: a causal model's first 10 positions do not see the rest
    padded, _ = layer_distributions(model, ids, attention_mask=mask)
    short, _ = layer_distributions(model, ids[:, :10])
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for key, value in short[name]["activation"].items():
            assert padded[name]["activation"][key] == pytest.approx(value, rel=1e-4), (name, key)


def test_compare_distributions_and_report_section(tmp_path) -> None:
    base = _tiny_llama()
    comp = _tiny_llama()
    with torch.no_grad():
        comp.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # a known change: weight absmax x2
    ids = torch.randint(0, 64, (2, 16))
    dist = compare_distributions({"baseline": base, "compressed": comp}, ids, torch.ones_like(ids), "2 windows")
    assert dist.plotted == notable_layers(dist.stats["baseline"]) and 1 <= len(dist.plotted) <= 4
    assert all(set(dist.hists[label]) == set(dist.plotted) for label in ("baseline", "compressed"))
    data = dist.to_json()
    assert data["layers"] == 14 and data["tokens"] == 32
    down = "model.layers.1.mlp.down_proj"
    w_absmax = {label: data[label][down]["weight"]["absmax"] for label in ("baseline", "compressed")}
    assert w_absmax["compressed"] == pytest.approx(2 * w_absmax["baseline"], rel=1e-5)
    dist.plot(tmp_path / "distribution.png")
    assert (tmp_path / "distribution.png").stat().st_size > 10_000

    section = distribution_section(data, top=3)
    assert section.startswith("\n## Weight and activation distributions\n")
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(line.count(" → ") == 5 for line in rows)


def test_report_section_exact_cells() -> None:
    def layer(w_absmax: float, ratio: float | None) -> dict:
        return {"weight": {"absmax": w_absmax, "kurtosis": 3.0},
                "activation": {"absmax": 10.0, "kurtosis": 4.0 if ratio else 640707.0, "channel_ratio": ratio}}

    dist = {"inputs": "1 window", "tokens": 8, "layers": 3, "plotted": ["b"],
            "baseline": {"a": layer(1.0, 2.0), "b": layer(2.0, 50.0), "c": layer(4.0, None)},
            "compressed": {"a": layer(0.5, 2.0), "b": layer(1.0, 40.0), "c": layer(2.0, None)}}
    section = distribution_section(dist, top=5)
    assert "| w absmax | 2 | 4 | 1 | 2 | `c` |" in section  # medians and maxima over the layers
    assert "| x kurtosis | 4 | 6.41e+05 | 4 | 6.41e+05 | `c` |" in section
    assert "| x channel ratio | 26 | 50 | 21 | 40 | `b` |" in section  # None (inf) left out
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == ["| `b` | 2 → 1 | 3 → 3 | 10 → 10 | 4 → 4 | 50 → 40 |",
                    "| `a` | 1 → 0.5 | 3 → 3 | 10 → 10 | 4 → 4 | 2 → 2 |"]


def test_distribution_windows_must_be_positive() -> None:
    from slimformer.errors import UserError
    from slimformer.evaluate.measure import EvalSettings

    with pytest.raises(UserError, match="distribution_windows must be a positive integer, got 0"):
        EvalSettings(distribution=True, distribution_windows=0)
