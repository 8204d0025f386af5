"""SmoothQuant math on tiny tensors: migration keeps the float product, balances the ranges, and
makes per-tensor W8A8 much more accurate when a few input channels carry outliers."""

from __future__ import annotations

import torch
from torch import nn

from slimformer.quant.qscheme import sqnr_db
from slimformer.quant.smoothquant import SmoothQuantConfig
from slimformer.quant.smoothquant_math import ChannelRange, smooth, smooth_scales, smoothed_range, weight_absmax
from slimformer.quant.static import static_layer


def _outlier_inputs(tokens: int = 256, width: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(tokens, width)
    x[:, [3, 17]] *= 60  # two outlier channels, as in LLM activations
    return x


def test_migration_leaves_the_float_output_unchanged() -> None:
    x = _outlier_inputs()
    linear = nn.Linear(64, 32)
    s = smooth_scales(x.abs().amax(0), weight_absmax([linear.weight]), 0.5)
    xs, ws = smooth(x, linear.weight.detach(), s)
    assert torch.allclose(nn.functional.linear(xs, ws, linear.bias), linear(x), rtol=1e-5, atol=1e-4)
    # and the quantized layer divides x by s before quantizing: with 8-bit codes it stays close
    layer = static_layer(linear, ws, smoothed_range(xs.amin(0), xs.amax(0), torch.ones(64)), SmoothQuantConfig(), s)
    assert sqnr_db(linear(x).detach(), layer(x).detach()) > 30


def test_scales_balance_activation_and_weight_ranges() -> None:
    x = _outlier_inputs()
    w = torch.randn(32, 64)
    a, wm = x.abs().amax(0), weight_absmax([w[:16], w[16:]])  # two layers sharing the input
    assert torch.equal(wm, w.abs().amax(0))
    s = smooth_scales(a, wm, 0.5)
    assert torch.allclose(a / s, wm * s, rtol=1e-5)  # alpha 0.5: equal ranges per channel
    assert torch.allclose(smooth_scales(a, wm, 1.0), a, rtol=1e-5)  # alpha 1: all into the weights
    assert torch.allclose(smooth_scales(a, wm, 0.0), 1 / wm, rtol=1e-5)
    dead = smooth_scales(torch.zeros(4), torch.ones(4), 0.5)
    assert torch.equal(dead, torch.ones(4))


def test_channel_range_streams_and_gives_the_smoothed_range() -> None:
    x = _outlier_inputs()
    obs = ChannelRange()
    for chunk in x.chunk(5):
        obs.update(chunk)
    assert torch.equal(obs.absmax(), x.abs().amax(0))
    s = torch.rand(64) + 0.5
    lo, hi = smoothed_range(obs.lo, obs.hi, s)
    assert (lo, hi) == (float((x / s).min()), float((x / s).max()))


def test_smoothing_makes_w8a8_more_accurate_on_outlier_channels() -> None:
    x = _outlier_inputs()
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    ref = linear(x).detach()
    plain = static_layer(linear, linear.weight, (float(x.min()), float(x.max())), SmoothQuantConfig())
    s = smooth_scales(x.abs().amax(0), weight_absmax([linear.weight]), 0.5)
    xs, ws = smooth(x, linear.weight.detach(), s)
    smoothed = static_layer(linear, ws, (float(xs.min()), float(xs.max())), SmoothQuantConfig(), s)
    gain = sqnr_db(ref, smoothed(x).detach()) - sqnr_db(ref, plain(x).detach())
    assert gain > 6  # at least 4x less error energy
