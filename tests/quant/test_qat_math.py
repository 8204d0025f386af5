"""QAT math on tiny tensors: STE gradients, LSQ gradients vs finite differences, exact RTN forward."""

from __future__ import annotations

import pytest
import torch

from slimformer.quant.qat_math import (
    fake_quant_ste, fp16_ste, grad_scale, lsq_grad_scale, quant_codes, weights_per_scale,
)
from slimformer.quant.qscheme import compute_qparams, expand_groups, fake_quantize, qrange


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 0, 4, 3])  # 3: ragged last group on 10 inputs
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_equals_rtn_dequantized_exactly(bits: int, group_size: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 10)
    deq, codes, qp = fake_quantize(w, bits, group_size, symmetric)
    got = fake_quant_ste(w, qp.scale.float(), qp.zero.float(), bits, group_size, symmetric)
    assert torch.equal(got, deq)
    assert torch.equal(quant_codes(w, qp.scale.float(), qp.zero.float(), bits, group_size, symmetric), codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ste_gradient_is_one_inside_the_range_and_zero_outside(symmetric: bool) -> None:
    bits, scale = 3, torch.full((1, 1), 0.5)
    zero = torch.full((1, 1), 0.0 if symmetric else 3.0)
    # codes: symmetric [-4, 3] -> w in [-2, 1.5]; asymmetric [0, 7] with z = 3 -> w in [-1.5, 2]
    w = torch.tensor([[-3.0, -1.2, -0.3, 0.0, 0.4, 1.1, 1.6, 2.5]], requires_grad=True)
    fake_quant_ste(w, scale, zero, bits, -1, symmetric).sum().backward()
    inside = [0, 1, 1, 1, 1, 1, 0, 0] if symmetric else [0, 1, 1, 1, 1, 1, 1, 0]
    assert torch.equal(w.grad, torch.tensor([inside], dtype=torch.float32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_lsq_scale_gradient_matches_finite_differences(symmetric: bool) -> None:
    # With the STE, the scale gradient is the derivative of the surrogate in which round(v) is
    # replaced by its current integer plus the change of v (v = w / s + z): LSQ's
    # round(v) - z - w / s inside the range, qmin - z / qmax - z where clipped. Central differences
    # of that surrogate, and the closed form by hand, must match autograd (per group, ragged too).
    torch.manual_seed(0)
    bits, group_size, in_f = 3, 4, 10
    w = torch.randn(3, in_f, dtype=torch.float64)
    qp = compute_qparams(w.float(), bits, group_size, symmetric)
    s0 = qp.scale.double() * 0.7  # a smaller step than min/max: some weights are clipped
    zero = qp.zero.double()
    scale = s0.clone().requires_grad_(True)
    target = torch.randn(3, in_f, dtype=torch.float64)
    ((fake_quant_ste(w, scale, zero, bits, group_size, symmetric) - target) ** 2).sum().backward()

    qmin, qmax = qrange(bits, symmetric)
    z = expand_groups(zero, in_f, group_size) if not symmetric else torch.zeros(3, in_f, dtype=torch.float64)
    se0 = expand_groups(s0, in_f, group_size)
    v = w / se0 + z
    codes = torch.round(v.clamp(qmin, qmax))  # the integers of the current point
    inside = (v >= qmin) & (v <= qmax)
    assert inside.any() and not inside.all()

    def surrogate(s: torch.Tensor) -> torch.Tensor:
        se = expand_groups(s, in_f, group_size)
        q = torch.where(inside, codes + (w / se - w / se0), codes)
        return (((q - z) * se - target) ** 2).sum()

    eps = 1e-7
    numeric = torch.zeros_like(s0)
    for i in range(s0.shape[0]):
        for j in range(s0.shape[1]):
            plus, minus = s0.clone(), s0.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (surrogate(plus) - surrogate(minus)) / (2 * eps)
    assert torch.allclose(scale.grad, numeric, rtol=1e-6, atol=1e-8)
    dwds = torch.where(inside, codes - z - w / se0, codes - z)
    per_weight = 2 * ((codes - z) * se0 - target) * dwds
    by_hand = torch.stack([per_weight[:, 0:4].sum(1), per_weight[:, 4:8].sum(1), per_weight[:, 8:].sum(1)], 1)
    assert torch.allclose(scale.grad, by_hand, rtol=1e-10, atol=1e-12)


def test_zero_point_gradient_is_zero_inside_and_minus_scale_outside() -> None:
    w = torch.tensor([[-3.0, -0.4, 0.2, 0.9, 5.0]])
    scale, zero = torch.full((1, 1), 0.5), torch.full((1, 1), 3.0, requires_grad=True)  # range [-1.5, 2]
    fake_quant_ste(w, scale, zero, 3, -1, False).sum().backward()
    assert zero.grad.item() == pytest.approx(-0.5 * 2)  # two clipped weights, -s each


def test_gradient_scale_and_fp16_ste() -> None:
    s = torch.tensor([0.1234567], requires_grad=True)
    (grad_scale(s, 0.25) * 3).sum().backward()
    assert s.grad.item() == pytest.approx(0.75)
    x = torch.tensor([0.1234567], requires_grad=True)
    y = fp16_ste(x)
    y.sum().backward()
    assert y.item() == x.half().float().item() and x.grad.item() == 1.0
    assert lsq_grad_scale(weights_per_scale(576, 10, 128), 3, False) == pytest.approx(1 / (128 * 7) ** 0.5)
    assert weights_per_scale(8, 6, -1) == 8 and weights_per_scale(8, 6, 0) == 48
