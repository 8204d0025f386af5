"""Pure mask functions for score-based unstructured pruning (scores: higher = more important)."""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.errors import UserError


def check_sparsity(sparsity: float) -> None:
    """UserError unless 0 <= sparsity < 1."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}.")


def layer_masks(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask removing exactly round(sparsity * numel) lowest scores (ties broken by position)."""
    check_sparsity(sparsity)
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        # a stable sort orders equal scores by position, so the count is exact and deterministic
        order = torch.sort(scores.reshape(-1).float(), stable=True).indices
        keep[order[:k]] = False
    return keep.view_as(scores)


def global_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep-masks removing exactly round(sparsity * total) lowest scores across all tensors."""
    check_sparsity(sparsity)
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = layer_masks(flat, sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def threshold_masks(scores: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Keep-masks keeping every score >= threshold."""
    if threshold < 0:
        raise UserError(f"threshold must be >= 0, got {threshold}.")
    return {name: s >= threshold for name, s in scores.items()}
