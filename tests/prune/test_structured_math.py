"""Structured pruning math: removal units under GQA, exact counts per scope, neuron rounding."""

from __future__ import annotations

import pytest
import torch

from slimformer.errors import UserError
from slimformer.prune.structured_math import (
    block_influence, blocks_to_drop, choose_heads, choose_neurons, head_units, round_to_multiple,
)


def test_within_units_take_the_least_important_head_of_every_group() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 4.0])  # 2 kv groups of 3 query heads
    units, cap = head_units(0, scores, kv_heads=2, gqa="within")
    assert cap == 2
    assert [u.heads for u in units] == [(1, 3), (2, 5), (0, 4)]
    assert units[0].score == pytest.approx(1.5)


def test_group_units_are_whole_kv_groups() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 4.0])
    units, cap = head_units(0, scores, kv_heads=2, gqa="groups")
    assert cap == 1
    assert [u.heads for u in units] == [(0, 1, 2), (3, 4, 5)]


def test_layer_scope_removes_exact_counts_and_keeps_one_head() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(12) for _ in range(3)]
    removed = choose_heads(scores, [12, 12, 12], 0.5, "layer", "within")
    assert [len(r) for r in removed] == [6, 6, 6]
    for s, r in zip(scores, removed):
        assert set(r) == set(s.argsort()[:6].tolist())
    removed = choose_heads(scores, [12, 12, 12], 0.9, "layer", "within")
    assert [len(r) for r in removed] == [11, 11, 11]  # never every head of a layer
    with pytest.raises(UserError, match="keeps at least one head"):
        choose_heads(scores, [12, 12, 12], 0.99, "layer", "within")


def test_global_scope_meets_the_total_and_varies_per_layer() -> None:
    scores = [torch.full((4,), 0.1), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    removed = choose_heads(scores, [4, 4], 0.25, "global", "within")
    assert [len(r) for r in removed] == [2, 0]


def test_gqa_within_removes_the_same_number_per_group() -> None:
    torch.manual_seed(1)
    scores = [torch.rand(9)]
    (removed,) = choose_heads(scores, [3], 0.34, "layer", "within")
    assert len(removed) == 3 and sorted(h // 3 for h in removed) == [0, 1, 2]
    (removed,) = choose_heads(scores, [3], 0.34, "layer", "groups")
    assert len(removed) == 3 and len({h // 3 for h in removed}) == 1


def test_too_many_heads_is_a_user_error() -> None:
    with pytest.raises(UserError, match="remove 5 of 6 heads, but at most 3 can go"):
        choose_heads([torch.rand(6)], [2], 0.9, "layer", "groups")


def test_neuron_counts_are_rounded_to_multiples() -> None:
    assert round_to_multiple(100.8, 144, 8) == 104
    assert round_to_multiple(0.3, 144, 8) == 8  # never empty
    assert round_to_multiple(5, 6, 8) == 6
    torch.manual_seed(0)
    scores = [torch.rand(64), torch.rand(64) + 1.0]
    kept = choose_neurons(scores, 0.25, "layer", 8)
    assert [len(k) for k in kept] == [48, 48]
    assert set(kept[0].tolist()) == set(scores[0].topk(48).indices.tolist())
    kept = choose_neurons(scores, 0.5, "global", 1)
    assert [len(k) for k in kept] == [1, 64]  # the low layer keeps its single best neuron


def test_block_influence_and_drop() -> None:
    x = torch.randn(4, 10, 16)
    assert float(block_influence(x, 2 * x)) == pytest.approx(0.0, abs=1e-6)
    assert float(block_influence(x, -x)) == pytest.approx(2.0, abs=1e-6)
    assert blocks_to_drop(torch.tensor([0.5, 0.1, 0.9, 0.2]), 2) == [1, 3]
    with pytest.raises(UserError):
        blocks_to_drop(torch.tensor([0.5, 0.1]), 2)
