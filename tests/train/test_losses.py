"""Distillation losses on small hand-checked examples."""

from __future__ import annotations

import math

import pytest
import torch

from slimformer.errors import UserError
from slimformer.train.losses import IGNORE, attention_kl, distill_loss, hidden_mse, kd_loss, layer_map
from slimformer.train.schedule import cubic_sparsity, lr_at, soft_threshold


def test_kd_loss_matches_hand_computed_value() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]  # softmax(s / T)
    pt = ps[::-1]  # softmax(t / T)
    expected = T**2 * sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(4 * (0.6225 - 0.3775) * 0.5, abs=1e-3)  # (p1 - p2) * ln(p1 / p2), ln ratio = 0.5


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_t_squared() -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 5, 11)
    assert kd_loss(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(3, 5, 11)
    # for large T, KL(T) ~ ||s - t||^2 / (2 T^2) (centred logits), so T^2 KL tends to a constant
    big = [kd_loss(s, t, T).item() for T in (50.0, 100.0)]
    assert big[0] == pytest.approx(big[1], rel=1e-2)
    raw = torch.nn.functional.kl_div(torch.log_softmax(s / 4, -1), torch.log_softmax(t / 4, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
    assert kd_loss(s, t, 4.0).item() == pytest.approx(16 * raw.item(), rel=1e-5)


def test_masked_positions_do_not_count() -> None:
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    t2 = t.clone()
    t2[mask == 0] = 100.0  # garbage under the mask
    assert kd_loss(s, t, 2.0, mask).item() == pytest.approx(kd_loss(s, t2, 2.0, mask).item(), rel=1e-6)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE], [3, IGNORE, IGNORE, IGNORE]])
    mixed = distill_loss(s, t, labels, 0.25, 2.0)
    ce = torch.nn.functional.cross_entropy(s[mask == 1], labels[mask == 1])
    assert mixed.item() == pytest.approx(0.25 * kd_loss(s, t, 2.0, mask).item() + 0.75 * ce.item(), rel=1e-5)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 0.0), (0.5, -1.0), (1.5, 2.0), (-0.1, 2.0), (0.5, float("nan"))])
def test_bad_values_are_user_errors(alpha: float, temperature: float) -> None:
    s = torch.randn(2, 3)
    with pytest.raises(UserError, match="temperature|alpha"):
        distill_loss(s, s, torch.tensor([0, 1]), alpha, temperature)


def test_hidden_attention_and_layer_map() -> None:
    a = torch.randn(2, 3, 4)
    assert hidden_mse(a, a).item() == 0.0
    proj = torch.nn.Linear(4, 6, bias=False)
    assert hidden_mse(a, proj(a).detach(), proj).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError, match="projection"):
        hidden_mse(a, torch.randn(2, 3, 6))
    att = torch.softmax(torch.randn(2, 4, 3, 3), -1)
    assert attention_kl(att, att).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(torch.softmax(torch.randn(2, 4, 3, 3), -1), att).item() > 0.01
    assert layer_map(3, 6) == [1, 3, 5]
    assert layer_map(2, 30) == [14, 29]
    with pytest.raises(UserError, match="blocks"):
        layer_map(7, 6)


def test_schedules() -> None:
    assert cubic_sparsity(0, 10, 0.5) == 0.0
    assert cubic_sparsity(10, 10, 0.5) == pytest.approx(0.5)
    assert cubic_sparsity(5, 10, 0.5) == pytest.approx(0.5 - 0.5 * 0.125)
    assert lr_at(0, 1.0, 10, warmup=2) == 0.5
    assert lr_at(2, 1.0, 10, warmup=2) == 1.0
    assert lr_at(10, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(7, 1.0, 10, schedule="constant") == 1.0
    w = torch.tensor([-0.3, -0.05, 0.0, 0.02, 0.5])
    assert torch.allclose(soft_threshold(w, 0.1), torch.tensor([-0.2, 0.0, 0.0, 0.0, 0.4]))
    assert int((w == 0).sum()) == 3
