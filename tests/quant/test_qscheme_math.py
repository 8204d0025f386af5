"""Affine quantization math on tiny tensors: error bounds, ranges, zeros, groups, fp16 scales."""

from __future__ import annotations

import pytest
import torch

from slimformer.errors import UserError
from slimformer.quant.qscheme import (
    compute_qparams, dequantize, expand_groups, fake_quantize, n_groups, qrange, quantize, sqnr_db,
)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 0, 32, 128])
def test_round_trip_error_within_half_a_step(bits: int, symmetric: bool, group_size: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 576) * torch.logspace(-3, 1, 6).unsqueeze(1)  # rows of very different scale
    w_hat, q, qp = fake_quantize(w, bits, group_size, symmetric)
    step = expand_groups(qp.scale.float(), 576, group_size)
    assert bool(((w - w_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())
    qmin, qmax = qrange(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert qp.scale.dtype == torch.float16 and qp.scale.shape == (1 if group_size == 0 else 6, n_groups(576, group_size))


def test_last_group_is_smaller_not_an_error() -> None:
    w = torch.randn(4, 576)
    qp = compute_qparams(w, 4, 128, False)
    assert qp.scale.shape == (4, 5)  # 576 = 4 x 128 + 64
    # the last group's scale is set by its own 64 columns only
    w2 = w.clone()
    w2[:, 512:] *= 100
    qp2 = compute_qparams(w2, 4, 128, False)
    assert torch.equal(qp2.scale[:, :4], qp.scale[:, :4]) and bool((qp2.scale[:, 4] > qp.scale[:, 4]).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_zeros_stay_exactly_zero(symmetric: bool) -> None:
    w = torch.randn(8, 64)
    w[w.abs() < 0.5] = 0.0
    w_hat, _, _ = fake_quantize(w, 3, 16, symmetric)
    assert bool((w_hat[w == 0] == 0).all())


def test_sqnr_grows_with_bits_and_all_zero_rows_are_safe() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    assert sqnr_db(w, fake_quantize(w, 8, -1, True)[0]) > 40
    assert sqnr_db(w, fake_quantize(w, 4, -1, True)[0]) < sqnr_db(w, fake_quantize(w, 8, -1, True)[0]) - 20
    w[3] = 0
    w_hat, _, qp = fake_quantize(w, 4, 32, False)
    assert bool(torch.isfinite(w_hat).all()) and bool((w_hat[3] == 0).all()) and bool((qp.scale > 0).all())


def test_dequantize_uses_the_stored_fp16_scale_exactly() -> None:
    w = torch.randn(5, 40)
    qp = compute_qparams(w, 4, 8, False)
    q = quantize(w, qp)
    manual = (q.float() - qp.zero.float().repeat_interleave(8, 1)) * qp.scale.half().float().repeat_interleave(8, 1)
    assert torch.equal(dequantize(q, qp), manual)


def test_asymmetric_8bit_codes_do_not_overflow() -> None:
    w = torch.rand(3, 64) * 5  # all positive: codes reach 255
    _, q, _ = fake_quantize(w, 8, -1, False)
    assert int(q.max()) == 255 and q.dtype == torch.int16


@pytest.mark.parametrize("bits, group_size", [(1, 128), (9, 128), (4, -2), (4.0, 128)])
def test_bad_scheme_values(bits, group_size) -> None:
    with pytest.raises(UserError):
        compute_qparams(torch.randn(2, 8), bits, group_size, True)
