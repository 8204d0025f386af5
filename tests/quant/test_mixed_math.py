"""Mixed-precision math: the allocation meets the budget and beats uniform on crafted scores."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimformer.quant.mixed_math import allocate_bits, fisher_sensitivity, layer_cost_bits


def test_layer_cost_counts_codes_scales_and_zeros() -> None:
    # 576 inputs in groups of 128: 5 groups per row (the last one 64 wide)
    assert layer_cost_bits(10, 576, 4, 128) == 10 * 576 * 4 + 10 * 5 * (16 + 4)
    assert layer_cost_bits(10, 576, 8, -1) == 10 * 576 * 8 + 10 * (16 + 8)
    assert layer_cost_bits(10, 576, 8, 0) == 10 * 576 * 8 + (16 + 8)


def test_allocation_is_optimal_on_a_small_instance() -> None:
    torch.manual_seed(0)
    bits = torch.tensor([2.0, 4.0, 8.0])
    sizes = torch.tensor([100.0, 300.0, 50.0, 200.0, 120.0])
    costs = sizes[:, None] * bits[None, :]
    scores = torch.rand(5, 1) * 10 * 4.0 ** -bits[None, :]  # error falls 4x per extra bit
    budget = float((sizes * 4).sum())
    choice = allocate_bits(scores, costs, budget)
    rows = torch.arange(5)
    assert costs[rows, choice].sum() <= budget
    best = min(
        (float(scores[rows, torch.tensor(c)].sum()) for c in itertools.product(range(3), repeat=5)
         if costs[rows, torch.tensor(c)].sum() <= budget),
    )
    assert float(scores[rows, choice].sum()) <= best * 1.05
    uniform = float(scores[:, 1].sum())
    assert float(scores[rows, choice].sum()) <= uniform


def test_budget_too_small_raises() -> None:
    with pytest.raises(ValueError):
        allocate_bits(torch.ones(2, 2), torch.tensor([[2.0, 4.0], [2.0, 4.0]]), 3.0)


def test_fisher_sensitivity_falls_with_bits_and_scales_with_fisher() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    f = torch.rand(16, 64)
    s = [fisher_sensitivity(w, f, b, 32, False) for b in (2, 4, 8)]
    assert s[0] > s[1] > s[2] > 0
    assert fisher_sensitivity(w, 2 * f, 4, 32, False) == pytest.approx(2 * s[1])
