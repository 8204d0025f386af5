"""Observers on tiny tensors: round-trip error bounds, exact percentile clipping, MSE and KL
clipping heavy tails, the streaming histogram, and the static QuantLinear's integer path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimformer.config import build_config
from slimformer.errors import UserError
from slimformer.layers import set_int_kernel
from slimformer.quant.observers import (
    KLObserver, MinMaxObserver, MSEObserver, PercentileObserver, act_qparams, make_observer,
    weight_clip_mse,
)
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import qrange
from slimformer.quant.smoothquant import SmoothQuantConfig
from slimformer.quant.static import StaticConfig, static_layer


def round_trip(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> torch.Tensor:
    """x quantized to the range [lo, hi] and dequantized, as the static layers do (the reference)."""
    scale, zero = act_qparams(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return (torch.round(x / scale + zero).clamp(qmin, qmax) - zero) * scale


def _mse(x: torch.Tensor, r: tuple[float, float], bits: int = 8, symmetric: bool = True) -> float:
    return float((round_trip(x, *r, bits, symmetric) - x).pow(2).mean())


def _heavy(n: int = 100_000) -> torch.Tensor:
    return torch.distributions.StudentT(2.0).sample((n,))


@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_round_trip_within_half_step(symmetric: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1000) * 3 + (0 if symmetric else 2)
    obs = MinMaxObserver()
    for row in x:  # streamed batch by batch
        obs.update(row)
    assert obs.range(8, symmetric) == (float(x.min()), float(x.max()))
    scale, _ = act_qparams(*obs.range(8, symmetric), 8, symmetric)
    err = (round_trip(x, *obs.range(8, symmetric), 8, symmetric) - x).abs().max()
    assert err <= scale / 2 * (1 + 1e-5)


def test_percentile_clips_exactly_the_expected_fraction() -> None:
    torch.manual_seed(0)
    x = (torch.randperm(20_000).float() + 1) * torch.where(torch.rand(20_000) < 0.5, -1.0, 1.0)  # distinct |x|
    obs = PercentileObserver(99.0)
    for chunk in x.chunk(7):
        obs.update(chunk)
    lo, hi = obs.range(8, True)
    assert int((x.abs() > hi).sum()) == 200  # exactly 1% of 20,000 above the threshold
    lo, hi = obs.range(8, False)  # asymmetric: half of the 1% in each tail
    assert int((x < lo).sum()) == 100 and int((x > hi).sum()) == 100


def test_percentile_sample_is_bounded_and_close() -> None:
    torch.manual_seed(0)
    obs = PercentileObserver(99.0, max_sample=50_000)
    x = torch.randn(400_000)
    for chunk in x.chunk(8):
        obs.update(chunk)
    assert obs.sample.numel() == 50_000 and obs.seen == 400_000
    exact = float(x.abs().kthvalue(int(0.99 * x.numel())).values)  # 2.576 for a normal
    assert abs(obs.range(8, True)[1] - exact) / exact < 0.03


@pytest.mark.parametrize(("dist", "gain8"), [("laplace", 0.9), ("student", 0.8)])
def test_mse_clip_beats_minmax_on_heavy_tails(dist: str, gain8: float) -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,)) if dist == "laplace" else _heavy(50_000)
    mse, mm = MSEObserver(), MinMaxObserver()
    for chunk in x.chunk(4):
        mse.update(chunk)
        mm.update(chunk)
    r_mse, r_mm = mse.range(8, True), mm.range(8, True)
    assert max(-r_mse[0], r_mse[1]) < max(-r_mm[0], r_mm[1])  # it clips
    # measured: Laplace 0.84, Student-t(2) 0.79; brute force over 100 thresholds: 0.84, 0.77
    assert _mse(x, r_mse) < gain8 * _mse(x, r_mm)
    peak = max(-r_mm[0], r_mm[1])
    scale = torch.linspace(0.01, 1, 100).view(-1, 1) * peak / 127  # (100, 1): every threshold at once
    brute = float((torch.round(x / scale).clamp(-128, 127) * scale - x).pow(2).mean(1).min())
    assert _mse(x, r_mse) < 1.05 * brute
    if dist == "laplace":  # measured 0.29 at 4 bits asymmetric
        assert _mse(x, mse.range(4, False), 4, False) < 0.5 * _mse(x, mm.range(4, False), 4, False)


def test_kl_threshold_below_max_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = _heavy(200_000)
    kl = KLObserver()
    kl.update(x)
    lo, hi = kl.range(8, True)
    assert hi < 0.5 * float(x.abs().max()) and hi > 5.0  # clips the tail, keeps the bulk (t2: 99% within 10)
    u = torch.rand(100_000) * 2 - 1  # nothing to clip on a uniform distribution
    kl_u = KLObserver()
    kl_u.update(u)
    assert kl_u.range(8, True)[1] > 0.9


def test_histogram_rebins_when_the_range_grows() -> None:
    torch.manual_seed(0)
    a, b = torch.rand(5000) * 2 - 1, torch.randn(5000) * 1.2  # b's max |x| ~ 4.5 > a's ~ 1
    obs = KLObserver()
    obs.update(a)
    obs.update(b)
    x = torch.cat([a, b])
    assert obs.top == pytest.approx(float(a.abs().max()) * 8)  # doubled 3 times to cover 4.5
    idx = (x.abs() * (obs.bins / obs.top)).long().clamp(max=obs.bins - 1)
    expected = torch.bincount(idx, minlength=obs.bins).double()
    moved = float((obs.pos + obs.neg - expected).abs().sum()) / 2  # only float rounding at bin edges
    assert float((obs.pos + obs.neg).sum()) == 10_000 and moved <= 5
    assert float(obs.neg.sum()) == float((x < 0).sum())


def test_weight_clip_mse_per_channel_never_worse_than_minmax() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:8] = torch.distributions.StudentT(2.0).sample((8, 256))  # heavy-tailed rows
    t = weight_clip_mse(w, 4)  # (16, 1)
    assert t.shape == (16, 1) and bool((t <= w.abs().amax(1, keepdim=True) + 1e-6).all())

    def row_err(thr: torch.Tensor) -> torch.Tensor:
        s = thr / 7
        return ((torch.round(w / s).clamp(-8, 7) * s - w) ** 2).sum(1)

    minmax = row_err(w.abs().amax(1, keepdim=True))
    assert bool((row_err(t) <= minmax + 1e-6).all())
    assert float(row_err(t)[:8].sum()) < 0.9 * float(minmax[:8].sum())


def test_static_int8_layer_matches_manual_integer_product(monkeypatch) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(3, 7, 64)
    layer = static_layer(linear, linear.weight, (-2.5, 2.5), StaticConfig())
    set_int_kernel(layer, True)  # static_layer leaves the float form on for calibration
    assert layer.int8_static
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.dtype) or real(a, b))
    y = layer(x)
    assert calls == [torch.int8]
    s_x = float(layer.act_scale)
    xq = torch.round(x.reshape(-1, 64) / s_x).clamp(-128, 127).long()  # (tokens, in)
    acc = xq @ layer.codes.long().t()  # (tokens, out) exact integers
    manual = acc.double() * s_x * layer.scale.double().view(1, -1) + linear.bias.double()
    assert torch.allclose(y.reshape(-1, 32).double(), manual, rtol=1e-6, atol=1e-6)
    set_int_kernel(layer, False)  # the same integer product as an fp32 matmul: no _int_mm call
    assert torch.allclose(layer(x), y, rtol=1e-6, atol=1e-6) and len(calls) == 1


def test_static_fake_quant_path_for_other_bit_widths() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    layer = static_layer(linear, linear.weight, (-1.0, 3.0), StaticConfig(a_bits=6, a_symmetric=False))
    assert not layer.int8_static and int(layer.act_zero) != 0
    expected = nn.functional.linear(round_trip(x, -1.0, 3.0, 6, False), layer.dequantized_weight(), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_static_spec_round_trip() -> None:
    linear = nn.Linear(16, 8)
    layer = static_layer(linear, linear.weight, (-1.0, 1.0), StaticConfig())
    spec = layer.spec()
    assert spec["act_bits"] == 8 and spec["act_symmetric"] is True
    clone = QuantLinear.from_spec(spec)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(clone(x), layer(x))
    assert "act_bits" not in QuantLinear.from_float(linear, bits=8, group_size=-1, symmetric=True).spec()


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"a_bits": 1}, "a_bits must be an integer from 2 to 8"),
        ({"w_bits": 9}, "w_bits"),
        ({"percentile": 0}, r"percentile must be in \(0, 100\]"),
        ({"percentile": 101}, r"percentile must be in \(0, 100\]"),
        ({"a_observer": "entropy"}, "unknown a_observer 'entropy'"),
        ({"w_observer": "kl"}, "unknown w_observer 'kl'"),
    ],
)
def test_static_config_rejects_bad_values(values: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        StaticConfig(**values)
    with pytest.raises(UserError):  # the recipe path rejects them too
        build_config(StaticConfig, values, "steps[0]")


def test_smoothquant_config_rejects_bad_alpha_and_unknown_observer() -> None:
    with pytest.raises(UserError, match=r"smoothquant: alpha must be in \[0.0, 1.0\], got 2"):
        SmoothQuantConfig(alpha=2)
    with pytest.raises(UserError, match="smoothquant: unknown a_observer"):
        SmoothQuantConfig(a_observer="foo")
    with pytest.raises(UserError, match="unknown activation observer 'foo'"):
        make_observer("foo")
