"""Mask math: exact counts with ties, global vs layer ranking, thresholds, bad values."""

from __future__ import annotations

import pytest
import torch

from slimformer.errors import UserError
from slimformer.prune.magnitude_math import global_masks, layer_masks, threshold_masks


def test_exact_count_with_ties() -> None:
    scores = torch.ones(6, 8)  # all tied
    keep = layer_masks(scores, 0.5)
    assert int((~keep).sum()) == 24
    scores = torch.arange(48.0).view(6, 8)
    keep = layer_masks(scores, 0.25)
    assert int((~keep).sum()) == 12 and bool((~keep).view(-1)[:12].all())


def test_global_vs_layer() -> None:
    small = torch.full((4, 4), 0.1) + torch.rand(4, 4) * 0.01
    large = torch.full((4, 4), 1.0) + torch.rand(4, 4)
    g = global_masks({"small": small, "large": large}, 0.5)
    assert int((~g["small"]).sum()) == 16 and int((~g["large"]).sum()) == 0
    per_layer = {"small": layer_masks(small, 0.5), "large": layer_masks(large, 0.5)}
    assert int((~per_layer["small"]).sum()) == 8 and int((~per_layer["large"]).sum()) == 8
    assert sum(int((~m).sum()) for m in g.values()) == sum(int((~m).sum()) for m in per_layer.values())


def test_threshold() -> None:
    keep = threshold_masks({"a": torch.tensor([0.0, 0.05, 0.2, 3.0])}, 0.1)["a"]
    assert keep.tolist() == [False, False, True, True]


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity(sparsity: float) -> None:
    with pytest.raises(UserError, match="sparsity"):
        layer_masks(torch.ones(3), sparsity)
    with pytest.raises(UserError):
        threshold_masks({"a": torch.ones(3)}, -1.0)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 0.99])
def test_exact_counts_with_heavy_ties(sparsity: float) -> None:
    torch.manual_seed(0)
    scores = torch.randint(0, 4, (6, 8)).float()  # only 4 distinct values: many ties at the cut
    keep = layer_masks(scores, sparsity)
    k = round(sparsity * 48)
    assert keep.dtype == torch.bool and keep.shape == (6, 8) and int((~keep).sum()) == k
    if 0 < k < 48:  # every removed score <= every kept score
        assert float(scores[~keep].max()) <= float(scores[keep].min())
    assert torch.equal(layer_masks(scores, sparsity), keep)  # deterministic


def test_ties_broken_by_position() -> None:
    keep = layer_masks(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5]), 0.6)  # removes 0.5 and the first two 1.0s
    assert keep.tolist() == [True, False, False, True, False]


def test_global_exact_total_with_ties_across_tensors() -> None:
    scores = {"a": torch.ones(3, 5), "b": torch.ones(7), "c": torch.zeros(2, 2)}
    g = global_masks(scores, 0.5)  # total 26: remove 13 = 4 zeros + first 9 ones in dict order
    assert [int((~m).sum()) for m in g.values()] == [9, 0, 4]
    assert all(g[n].shape == s.shape and g[n].dtype == torch.bool for n, s in scores.items())
    assert global_masks({}, 0.5) == {}


def test_threshold_keeps_equal_and_rejects_nan() -> None:
    masks = threshold_masks({"a": torch.tensor([[0.1, 0.2], [0.3, 0.0]]), "b": torch.tensor([5.0])}, 0.2)
    assert masks["a"].tolist() == [[False, True], [True, False]] and masks["b"].tolist() == [True]
    with pytest.raises(UserError, match="threshold"):
        threshold_masks({"a": torch.ones(2)}, float("nan"))
