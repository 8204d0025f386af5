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
