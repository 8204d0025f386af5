"""Activation-aware scores (Wanda) and outlier-weighted layer sparsities (OWL): pure tensor math.

Wanda (Sun et al., 2023) scores a weight by |w_ij| * ||x_j||_2, the norm of its input column over
the calibration tokens, and compares weights within each output row. OWL (Yin et al., 2023) gives
Transformer blocks whose Wanda scores hold more outliers (scores above M times their mean) a lower
sparsity, within target +- lambda, with the parameter-weighted mean sparsity equal to the target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.errors import UserError


def wanda_scores(w: Tensor, col_norm: Tensor) -> Tensor:
    """|w| * ||x_j||: w (out, in), col_norm (in,) -> (out, in) fp32 scores."""
    return w.detach().float().abs() * col_norm.float().unsqueeze(0)


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """Fraction of all entries of `scores` (taken together) above m times their common mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: Tensor, params: Tensor, target: float, lam: float, max_sparsity: float = 0.99) -> Tensor:
    """Per-block sparsities (L,) from outlier ratios (L,) and parameter counts (L,).

    Linear in the normalised ratio: the block with the most outliers gets target - lam, the one with
    the fewest target + lam; then shifted so that sum(params * s) / sum(params) == target, and, when
    a value leaves [0, max_sparsity], clipped there with the rest shifted again (water-filling).
    """
    r, p = ratios.double(), params.double()
    if not 0.0 <= target <= max_sparsity:
        raise UserError(f"owl: target sparsity must be in [0, {max_sparsity}], got {target}.")
    spread = r.max() - r.min()
    z = (r - r.min()) / spread if spread > 0 else torch.full_like(r, 0.5)  # 0 fewest .. 1 most outliers
    s = target + lam * (1.0 - 2.0 * z)
    fixed = torch.zeros_like(s, dtype=torch.bool)
    for _ in range(len(s) + 1):  # each round fixes at least one more block, or ends
        free = ~fixed
        if not free.any():
            return s
        budget = target * p.sum() - (p[fixed] * s[fixed]).sum()  # weighted sparsity the free blocks must hold
        s[free] += (budget - (p[free] * s[free]).sum()) / p[free].sum()
        out = free & ((s < 0) | (s > max_sparsity))
        if not out.any():
            return s
        s[out] = s[out].clamp(0.0, max_sparsity)
        fixed |= out
    raise AssertionError("owl water-filling did not converge")  # unreachable: target lies within the bounds
