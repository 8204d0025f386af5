"""AWQ math: scaling salient channels lowers output error vs RTN; alpha=0 is plain RTN."""

from __future__ import annotations

import pytest
import torch

from slimformer.quant.awq_math import (
    awq_search, channel_scales, clip_search, diagonal_blocks, output_error, weight_mean,
)
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import compute_qparams, dequantize, fake_quantize, quantize


def _outlier_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2048, 128)
    x[:, :4] *= 30  # a few salient channels, as in real LLM activations
    return torch.randn(64, 128), x


def test_scales_normalised() -> None:
    s = channel_scales(torch.tensor([0.1, 1.0, 10.0]), 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(channel_scales(torch.tensor([0.1, 1.0, 10.0]), 0.0), torch.ones(3))


def test_awq_beats_rtn_with_salient_channels() -> None:
    w, x = _outlier_inputs()
    s, alpha, ratio, _ = awq_search(w, x.T @ x, x.abs().mean(0), 3, 32, False)
    assert alpha > 0 and ratio < 0.8
    w_awq = fake_quantize(w * s, 3, 32, False)[0] / s
    w_rtn = fake_quantize(w, 3, 32, False)[0]
    err = lambda w_hat: (x @ (w - w_hat).T).pow(2).mean()  # noqa: E731
    assert err(w_awq) < 0.8 * err(w_rtn)


def test_output_error_matches_rows() -> None:
    w, x = _outlier_inputs()
    dw = torch.randn_like(w) * 1e-2
    assert torch.allclose(output_error(dw, x.T @ x), (x @ dw.T).pow(2).sum(), rtol=1e-3)


def test_input_scaled_layer_computes_the_scaled_weight() -> None:
    w, x = _outlier_inputs()
    s = channel_scales(x.abs().mean(0), 0.5)
    linear = torch.nn.Linear(128, 64, bias=False)
    q = QuantLinear.from_float(linear, bits=4, group_size=32, symmetric=False, weight=w * s)
    layer = QuantLinear.from_codes(q.codes, q.qparams(), None, input_scaled=True)
    layer.input_scale.copy_(s)
    expected = x @ (fake_quantize(w * s, 4, 32, False)[0] / s).T
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_duo_candidates_never_lose_to_plain() -> None:
    w, x = _outlier_inputs()
    w[:, 100:] *= 5  # channels whose weights are large: the duo family can scale them down
    h, act = x.T @ x, x.abs().mean(0)
    plain = awq_search(w, h, act, 3, 32, False, duo=False)
    both = awq_search(w, h, act, 3, 32, False, duo=True)
    assert not plain[3] and both[2] <= plain[2]


def test_weight_mean_per_group_with_a_short_last_group() -> None:
    w = torch.tensor([[1.0, -2.0, 4.0, 1.0, 3.0], [2.0, 2.0, 1.0, -1.0, 6.0]])
    # groups of 2 over 5 columns: {0, 1}, {2, 3}, {4}; |w| / group max, averaged over the rows
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (1.0 + 1.0) / 2, (0.25 + 1.0) / 2, 1.0])
    assert torch.allclose(weight_mean(w, 2), expected)
    assert torch.allclose(weight_mean(w, -1), torch.tensor([(0.25 + 1 / 3) / 2, (0.5 + 1 / 3) / 2, (1.0 + 1 / 6) / 2,
                                                             (0.25 + 1 / 6) / 2, (0.75 + 1.0) / 2]))


def test_diagonal_blocks_with_a_short_last_group() -> None:
    h = torch.arange(100.0).view(10, 10)
    blocks = diagonal_blocks(h, 4)  # groups [0:4], [4:8], [8:10] (padded)
    assert blocks.shape == (3, 4, 4)
    assert torch.equal(blocks[1], h[4:8, 4:8])
    assert torch.equal(blocks[2, :2, :2], h[8:10, 8:10]) and blocks[2, 2:].abs().sum() == 0


@pytest.mark.parametrize("group_size", [16, 20, -1])
def test_clip_search_lowers_group_errors(group_size: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    w[:, 3] *= 8  # outliers make plain min/max waste levels
    x = torch.randn(256, 40)
    h = x.T @ x
    clip = clip_search(w, h, 3, group_size, symmetric=False)
    assert clip.shape == (12, 1 if group_size == -1 else -(-40 // group_size))
    assert bool((clip <= 1).all()) and bool((clip >= 0.5).all()) and bool((clip < 1).any())
    plain = fake_quantize(w, 3, group_size, False)[0]
    qp = compute_qparams(w, 3, group_size, False, clip=clip)
    clipped = dequantize(quantize(w, qp), qp)
    if group_size == -1:  # rows are independent: the exact output error can only fall
        assert output_error(clipped - w, h) < 0.95 * output_error(plain - w, h)
    else:
        assert output_error(clipped - w, h) < output_error(plain - w, h)
    assert clip_search(w, h, 3, 0, symmetric=False) is None


@pytest.mark.parametrize("symmetric, rules", [(True, {"scale_rule": "signed_max"}), (False, {"zero_point": "float"})])
def test_awq_search_and_clip_with_llama_cpp_rules(symmetric: bool, rules: dict) -> None:
    w, x = _outlier_inputs()
    h = x.T @ x
    s, alpha, ratio, _ = awq_search(w, h, x.abs().mean(0), 3, 32, symmetric, **rules)
    assert alpha > 0 and ratio < 0.8
    err = lambda w_hat: output_error(w_hat - w, h)  # noqa: E731
    w_awq = fake_quantize(w * s, 3, 32, symmetric, **rules)[0] / s
    assert err(w_awq) < 0.8 * err(fake_quantize(w, 3, 32, symmetric, **rules)[0])
    clip = clip_search(w * s, h / (s[:, None] * s[None, :]), 3, 32, symmetric, **rules)
    assert bool((clip < 1).any()) and bool((clip >= 0.5).all())
    qp = compute_qparams(w * s, 3, 32, symmetric, clip=clip, **rules)
    assert qp.rule == ("signed_max" if symmetric else "float")
    assert err(dequantize(quantize(w * s, qp), qp) / s) <= err(w_awq)
