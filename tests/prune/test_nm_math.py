"""N:M and per-row masks, Wanda scores and OWL allocation: exact counts on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from slimformer.errors import UserError
from slimformer.prune.magnitude_math import layer_masks
from slimformer.prune.nm_math import check_divides, nm_masks, parse_pattern, row_masks
from slimformer.prune.wanda_math import outlier_ratio, owl_sparsities, wanda_scores


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_exact_in_every_group(n: int, m: int) -> None:
    torch.manual_seed(0)
    scores = torch.randn(16, 64).abs()
    keep = nm_masks(scores, n, m)
    groups = keep.view(16, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())  # every group keeps exactly n
    kept_min = torch.where(groups, scores.view(16, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, scores.view(16, -1, m), -torch.inf).amax(-1)
    assert bool((kept_min >= pruned_max).all())  # and they are the group's n highest


def test_nm_ties_exact_and_earliest_pruned() -> None:
    keep = nm_masks(torch.ones(3, 8), 2, 4)
    assert keep.tolist() == [[False, False, True, True] * 2] * 3


def test_row_masks_exact_per_row() -> None:
    torch.manual_seed(0)
    scores = torch.rand(5, 10)
    scores[0] = 1.0  # ties in one row
    keep = row_masks(scores, 0.3)
    assert (~keep).sum(dim=1).tolist() == [3] * 5
    assert keep[0].tolist() == [False] * 3 + [True] * 7
    uneven = row_masks(scores, 0.25)  # 12 of 50 in all: 2.5 per row -> 3, 3, 2, 2, 2
    assert (~uneven).sum(dim=1).tolist() == [3, 3, 2, 2, 2] and int((~uneven).sum()) == 12


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:2", "2-4", "a:b", 24])
def test_bad_patterns_are_user_errors(bad) -> None:
    with pytest.raises(UserError, match="pattern"):
        parse_pattern(bad)


def test_pattern_must_divide_width() -> None:
    assert check_divides("2:4", 576, "x") == (2, 4)
    with pytest.raises(UserError, match=r"multiple of M=8.*'model.layers.0.q_proj' has 12 inputs"):
        check_divides("4:8", 12, "model.layers.0.q_proj")


def test_wanda_ranking_differs_from_magnitude_when_activations_skewed() -> None:
    # column 0 has small weights but a huge input norm: magnitude prunes it, Wanda keeps it
    w = torch.tensor([[0.1, 0.5, 0.6, 0.7], [0.2, 0.4, 0.3, 0.8]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])
    scores = wanda_scores(w, norms)
    assert torch.allclose(scores, w.abs() * norms)
    by_wanda, by_magnitude = row_masks(scores, 0.25), row_masks(w.abs(), 0.25)
    assert bool(by_wanda[:, 0].all()) and not bool(by_magnitude[:, 0].any())
    assert not torch.equal(by_wanda, by_magnitude)


def test_outlier_ratio_counts_over_all_tensors() -> None:
    a, b = torch.ones(10), torch.ones(10)
    b[0] = 100.0  # mean over both = (19 + 100) / 20 = 5.95
    assert outlier_ratio([a, b], 5.0) == pytest.approx(1 / 20)
    assert outlier_ratio([a, b], 20.0) == 0.0


def test_owl_keeps_weighted_mean_and_spares_outlier_blocks() -> None:
    ratios = torch.tensor([0.01, 0.05, 0.02, 0.03])
    params = torch.tensor([100.0, 100.0, 300.0, 50.0])
    s = owl_sparsities(ratios, params, 0.6, 0.08)
    assert float((s * params).sum() / params.sum()) == pytest.approx(0.6, abs=1e-12)
    assert int(s.argmin()) == 1 and int(s.argmax()) == 0  # most outliers -> least sparsity
    assert float(s.max() - s.min()) == pytest.approx(0.16, abs=1e-9)


def test_owl_clips_to_valid_range_and_still_meets_mean() -> None:
    params = torch.ones(4)
    s = owl_sparsities(torch.tensor([0.0, 0.0, 0.0, 1.0]), params, 0.05, 0.2)
    assert float(s.min()) == 0.0 and float(s.mean()) == pytest.approx(0.05, abs=1e-12)
    assert torch.equal(owl_sparsities(torch.full((3,), 0.1), torch.ones(3), 0.5, 0.08), torch.full((3,), 0.5).double())


def test_layer_masks_unchanged() -> None:
    assert int((~layer_masks(torch.arange(10.0), 0.3)).sum()) == 3
