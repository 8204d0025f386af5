"""Semi-structured N:M sparsity and per-row masks: pure functions on score tensors.

N:M keeps the N highest scores in every group of M consecutive input columns of each row (so
"2:4" zeroes exactly half the weights, two in every four). Masks are keep-masks (True = keep);
among equal scores the earlier column is pruned first, so counts are exact even with ties.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from slimformer.errors import UserError
from slimformer.prune.magnitude_math import check_sparsity

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" -> (n, m) with 1 <= n < m; UserError otherwise."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise UserError(f"pattern must look like \"N:M\" (e.g. \"2:4\": keep 2 of every 4 weights), got {pattern!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise UserError(
            f"pattern \"{pattern}\": N:M keeps N of every M consecutive weights, so it needs 1 <= N < M "
            f"(e.g. \"2:4\", \"4:8\"), got N={n}, M={m}."
        )
    return n, m


def check_divides(pattern: str, in_features: int, where: str) -> tuple[int, int]:
    """(n, m) of `pattern`; UserError when M does not divide the layer's input width."""
    n, m = parse_pattern(pattern)
    if in_features % m:
        raise UserError(
            f"pattern \"{pattern}\" needs the input width to be a multiple of M={m}, but '{where}' has "
            f"{in_features} inputs; use another M or leave this layer out with `ignore`."
        )
    return n, m


def nm_masks(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask (bool, scores' shape (out, in)) keeping the n highest scores of each m-column group."""
    out_f, in_f = scores.shape
    groups = scores.detach().float().reshape(out_f, in_f // m, m)  # (out, in/m, m)
    # stable ascending sort: the m - n lowest go, ties broken towards the earlier column
    order = torch.sort(groups, dim=-1, stable=True).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.view(out_f, in_f)


def row_masks(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask removing the lowest scores of every row (Wanda's comparison groups): exactly
    round(sparsity * numel) in all, floor or ceil of sparsity * in per row (the first rows take one
    more when the total does not split evenly)."""
    check_sparsity(sparsity)
    out_f, in_f = scores.shape
    total = round(sparsity * out_f * in_f)
    per_row = torch.full((out_f, 1), total // out_f, device=scores.device)
    per_row[: total % out_f] += 1
    order = torch.sort(scores.detach().float(), dim=1, stable=True).indices  # (out, in) ascending
    drop_sorted = torch.arange(in_f, device=scores.device).unsqueeze(0) < per_row  # (out, in)
    return torch.ones(out_f, in_f, dtype=torch.bool, device=scores.device).scatter_(1, order, ~drop_sorted)
