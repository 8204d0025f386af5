"""Pure mask functions for score-based unstructured pruning (scores: higher = more important).

Masks are keep-masks (True = keep). Counts are exact: k = round(sparsity * numel) entries are
removed, the k lowest scores; among scores equal to the k-th lowest, the earliest positions (in
row-major order, tensors in dict order for the global ranking) are removed first. The cut uses
`kthvalue` plus a tie fix-up rather than a full sort, so ~100M scores need about 1 GB, not 2+ GB.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from slimformer.errors import UserError


def check_sparsity(sparsity: float) -> None:
    """UserError unless 0 <= sparsity < 1."""
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0
    if not ok:
        raise UserError(
            f"sparsity must be a fraction in [0, 1) (e.g. 0.5 removes half the weights), got {sparsity!r}."
        )


def _keep_flat(flat: Tensor, k: int) -> Tensor:
    """(n,) fp32 scores -> (n,) bool keep-mask with exactly the k lowest (earliest on ties) removed."""
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k == 0:
        return keep
    if bool(torch.isnan(flat).any()):
        raise UserError("pruning scores contain NaN (NaN weights?); cannot rank them. Check the model checkpoint.")
    cut = torch.kthvalue(flat, k).values  # the k-th lowest score
    below = flat < cut  # all of these go
    keep &= ~below
    n_ties = k - int(below.sum())  # how many scores equal to `cut` go too, earliest first
    tie_idx = torch.nonzero(flat == cut).squeeze(1)[:n_ties]  # (n_ties,), ascending positions
    keep[tie_idx] = False
    return keep


def remove_lowest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask (bool, scores' shape) removing exactly the k lowest scores (earliest on ties)."""
    return _keep_flat(scores.detach().reshape(-1).float(), k).view(scores.shape)


def layer_masks(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (bool, scores' shape) removing exactly round(sparsity * numel) lowest scores."""
    check_sparsity(sparsity)
    k = round(sparsity * scores.numel())
    return _keep_flat(scores.detach().reshape(-1).float(), k).view(scores.shape)


def global_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep-masks removing exactly round(sparsity * total) lowest scores across all tensors together."""
    check_sparsity(sparsity)
    if not scores:
        return {}
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])  # (total,) fp32
    keep = _keep_flat(flat, round(sparsity * flat.numel()))
    del flat
    sizes = [s.numel() for s in scores.values()]
    parts = torch.split(keep, sizes)  # views into `keep`, in dict order
    return {name: part.view(s.shape) for (name, s), part in zip(scores.items(), parts)}


def threshold_masks(scores: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Keep-masks keeping every score >= threshold."""
    ok = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool) and math.isfinite(threshold)
    if not ok or threshold < 0:
        raise UserError(f"threshold must be a finite number >= 0 (scores below it are pruned), got {threshold!r}.")
    return {name: s.detach() >= threshold for name, s in scores.items()}
