"""Affine quantization math: error bounds, code ranges, exact zeros, short last groups, fp16 scales."""

from __future__ import annotations

import math

import pytest
import torch

from slimformer.errors import UserError
from slimformer.quant.qscheme import (
    compute_qparams, dequantize, expand_groups, fake_quantize, n_groups, qrange, quantize, sqnr_db,
)
from slimformer.recipe import Recipe


def _w(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(6, 576) * torch.logspace(-3, 1, 6).unsqueeze(1)  # rows of very different magnitude


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0, 32, 128])
def test_round_trip_within_half_a_step(bits: int, symmetric: bool, group_size: int) -> None:
    w = _w(bits)
    w_hat, q, qp = fake_quantize(w, bits, group_size, symmetric)
    step = expand_groups(qp.scale.float(), 576, group_size).expand(6, 576)
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-7 * step).all())
    qmin, qmax = qrange(bits, symmetric)
    assert q.dtype == torch.int16 and q.shape == (6, 576)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert qp.scale.dtype == torch.float16 and qp.zero.dtype == torch.int16
    expected_shape = (1, 1) if group_size == 0 else (6, n_groups(576, group_size))
    assert tuple(qp.scale.shape) == expected_shape and tuple(qp.zero.shape) == expected_shape
    if symmetric:
        assert bool((qp.zero == 0).all())
    assert bool(torch.isfinite(w_hat).all())


def test_n_groups() -> None:
    assert n_groups(576, 128) == 5 and n_groups(576, 32) == 18
    assert n_groups(576, -1) == 1 and n_groups(576, 0) == 1 and n_groups(100, 1000) == 1


def test_short_last_group_has_its_own_64_columns() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 576)
    qp = compute_qparams(w, 4, 128, False)
    assert tuple(qp.scale.shape) == (6, 5)
    # group 4 covers exactly columns 512..575: the expanded scale shows 64 columns of it
    cols = expand_groups(torch.arange(5).view(1, 5), 576, 128)[0]
    assert int((cols == 4).sum()) == 64 and int((cols == 3).sum()) == 128
    # scaling only those 64 columns moves only the last group's scale
    w2 = w.clone()
    w2[:, 512:] *= 100
    qp2 = compute_qparams(w2, 4, 128, False)
    assert torch.equal(qp2.scale[:, :4], qp.scale[:, :4])
    assert bool((qp2.scale[:, 4] > 50 * qp.scale[:, 4]).all())
    # last-group scale equals the per-channel scale of the 64-column slice alone
    assert torch.equal(qp2.scale[:, 4:], compute_qparams(w2[:, 512:], 4, -1, False).scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0, 16, 128])
def test_zeros_stay_exactly_zero(symmetric: bool, group_size: int) -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 200) + 0.7  # mostly positive: asymmetric zero point is not trivially qmin
    w[torch.rand_like(w) < 0.4] = 0.0
    w_hat, _, _ = fake_quantize(w, 3, group_size, symmetric)
    assert int((w == 0).sum()) > 400
    assert bool((w_hat[w == 0] == 0).all())


def test_sqnr_8bit_above_40db_and_4bit_worse() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    s8 = sqnr_db(w, fake_quantize(w, 8, -1, True)[0])
    s4 = sqnr_db(w, fake_quantize(w, 4, -1, True)[0])
    assert s8 > 40 and s4 < s8 - 20  # ~6 dB per bit
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.0])) == pytest.approx(20.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0, 32])
def test_all_zero_rows_no_nan(symmetric: bool, group_size: int) -> None:
    w = torch.randn(4, 96)
    w[1] = 0
    w_hat, q, qp = fake_quantize(w, 4, group_size, symmetric)
    assert bool(torch.isfinite(w_hat).all()) and bool((w_hat[1] == 0).all())
    assert bool((qp.scale.float() > 0).all()) and bool(torch.isfinite(qp.scale.float()).all())
    z = fake_quantize(torch.zeros(3, 10), 4, 0, symmetric)[0]
    assert bool((z == 0).all())


def test_tiny_weights_do_not_underflow_fp16() -> None:
    w = torch.randn(2, 64) * 1e-6  # scale ~ 3e-8 at 8 bits: below fp16's smallest normal
    w_hat, _, qp = fake_quantize(w, 8, -1, True)
    assert bool((qp.scale.float() > 0).all())
    step = qp.scale.float()
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-7 * step).all())
    assert sqnr_db(w, w_hat) > 20


def test_fp16_scale_is_exact_in_storage() -> None:
    torch.manual_seed(3)
    w = torch.randn(5, 40)
    for symmetric in (True, False):
        qp = compute_qparams(w, 4, 8, symmetric)
        q = quantize(w, qp)
        scale = qp.scale.half().float().repeat_interleave(8, 1)  # what an fp16 artifact stores
        manual = (q.float() - qp.zero.float().repeat_interleave(8, 1)) * scale
        assert torch.equal(dequantize(q, qp), manual)
        # rebuilding QParams from fp16-stored tensors reproduces the same weights bit for bit
        stored = type(qp)(qp.scale.half().clone(), qp.zero.clone(), 4, 8, symmetric)
        assert torch.equal(dequantize(q, stored), dequantize(q, qp))


def test_asymmetric_8bit_codes_reach_255() -> None:
    w = torch.rand(3, 64) * 5 + 0.01  # all positive: zero point 0, codes reach 255
    _, q, qp = fake_quantize(w, 8, -1, False)
    assert int(q.max()) == 255 and q.dtype == torch.int16 and bool((qp.zero == 0).all())


@pytest.mark.parametrize("bits, group_size", [(1, 128), (9, 128), (4, -2), (4.0, 128), (4, 1.5), (True, 128)])
def test_bad_scheme_values(bits, group_size) -> None:
    with pytest.raises(UserError, match="bits|group_size"):
        compute_qparams(torch.randn(2, 8), bits, group_size, True)


@pytest.mark.parametrize("step, message", [
    ("{method: rtn, bits: 9}", "rtn: bits must be an integer from 2 to 8, got 9."),
    ("{method: gptq, bits: 1}", "gptq: bits must be an integer from 2 to 8, got 1."),
    ("{method: awq, group_size: -2}",
     "awq: group_size must be -1 (per output channel), 0 (per tensor) or a positive group size, got -2."),
    ("{method: mixed, avg_bits: 4, choices: [2, 9]}", "mixed: bits must be an integer from 2 to 8, got 9."),
])
def test_method_configs_name_themselves_in_scheme_errors(step: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        Recipe.from_yaml(f"steps: [{step}]")
    assert str(err.value) == message


def test_nonfinite_and_bad_shape_rejected() -> None:
    w = torch.randn(2, 8)
    w[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        compute_qparams(w, 4, -1, False)
    with pytest.raises(UserError, match="2-D"):
        compute_qparams(torch.randn(8), 4, -1, False)
