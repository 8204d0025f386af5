"""Pure tensor functions for structured pruning: which heads, neurons and blocks go.

Heads are removed in *units* that keep grouped-query attention valid: with `gqa="groups"` a unit
is one key/value head and all its query heads; with `gqa="within"` a unit is one query head from
every group (the j-th least important of each), so every group keeps the same number of heads.
Without GQA (one key/value head per query head) a unit is a single head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from slimformer.errors import UserError

GQA = Literal["groups", "within"]


@dataclass(frozen=True)
class HeadUnit:
    """Query heads removed together in one layer, and their summed importance."""

    layer: int
    heads: tuple[int, ...]
    score: float
    rank: int  # order inside its layer (within mode: units must go in this order)


def head_units(layer: int, scores: Tensor, kv_heads: int, gqa: GQA) -> tuple[list[HeadUnit], int]:
    """Removal units of one layer from per-query-head `scores` (H,), and how many may be removed
    while the layer keeps at least one head (GQA: one group, or one head per group)."""
    n = scores.numel()
    per_group = n // kv_heads
    if per_group == 1 or gqa == "groups":
        grouped = scores.reshape(kv_heads, per_group)  # (kv, q per kv)
        heads = torch.arange(n).reshape(kv_heads, per_group)
        units = [HeadUnit(layer, tuple(heads[g].tolist()), float(grouped[g].sum()), 0) for g in range(kv_heads)]
        return sorted(units, key=lambda u: u.score), kv_heads - 1
    grouped = scores.reshape(kv_heads, per_group)
    order = grouped.argsort(dim=1, stable=True)  # (kv, q per kv): least important first in each group
    heads = order + torch.arange(kv_heads)[:, None] * per_group
    ranked = grouped.gather(1, order)
    units = [HeadUnit(layer, tuple(sorted(heads[:, j].tolist())), float(ranked[:, j].sum()), j) for j in range(per_group)]
    return units, per_group - 1


def normalize_per_layer(scores: list[Tensor]) -> list[Tensor]:
    """Each layer's scores divided by their L2 norm (Michel et al. 2019), so layers compare globally."""
    return [s / s.norm().clamp_min(torch.finfo(s.dtype).tiny) for s in scores]


def choose_heads(
    scores: list[Tensor], kv_heads: list[int], sparsity: float, scope: Literal["layer", "global"], gqa: GQA
) -> list[list[int]]:
    """Query heads to remove per layer: the least important units until `sparsity` of the heads
    (per layer, or of all heads with `scope="global"`) is removed, rounded to whole units."""
    per_layer = [head_units(i, s, kv, gqa) for i, (s, kv) in enumerate(zip(scores, kv_heads))]
    total = sum(s.numel() for s in scores)
    removable = sum(sum(len(u.heads) for u in units[:cap]) for units, cap in per_layer)
    if sparsity * total > removable + 0.5 * max(len(u.heads) for units, _ in per_layer for u in units):
        raise UserError(
            f"heads: sparsity {sparsity} asks to remove {sparsity * total:.0f} of {total} heads, but at most "
            f"{removable} can go while every layer keeps at least one head"
            f"{' per key/value group' if gqa == 'within' else ' (one key/value group)'}."
        )
    if scope == "layer":
        return [[h for _, h in _greedy(units, {i: cap}, sparsity * s.numel())]
                for i, ((units, cap), s) in enumerate(zip(per_layer, scores))]
    pooled = [u for units, _ in per_layer for u in units]
    removed = _greedy(pooled, {i: cap for i, (_, cap) in enumerate(per_layer)}, sparsity * total)
    layer_of: dict[int, list[int]] = {i: [] for i in range(len(scores))}
    for layer, head in removed:
        layer_of[layer].append(head)
    return [sorted(layer_of[i]) for i in range(len(scores))]


def _greedy(units: list[HeadUnit], caps: dict[int, int], target: float) -> list[tuple[int, int]]:
    """(layer, head) pairs of the least important units, taken while the removed count gets
    closer to `target` and each layer's cap allows."""
    taken: dict[int, int] = {}
    removed: list[tuple[int, int]] = []
    count = 0
    for u in sorted(units, key=lambda u: (u.score, u.layer, u.rank)):
        if taken.get(u.layer, 0) >= caps[u.layer] or count + len(u.heads) / 2 > target:
            continue
        if u.rank > taken.get(u.layer, 0):  # within-group units must go in rank order
            continue
        taken[u.layer] = taken.get(u.layer, 0) + 1
        count += len(u.heads)
        removed.extend((u.layer, h) for h in u.heads)
    return sorted(removed)


def round_to_multiple(count: float, size: int, multiple_of: int) -> int:
    """`count` rounded to the nearest multiple of `multiple_of` (halves up: keep more), within
    [min(multiple_of, size), size]."""
    m = max(1, multiple_of)
    k = math.floor(count / m + 0.5) * m
    return max(min(m, size), min(size, k))


def choose_neurons(
    scores: list[Tensor], sparsity: float, scope: Literal["layer", "global"], multiple_of: int = 8
) -> list[Tensor]:
    """Indices of the FFN neurons to keep per layer (sorted): the most important `1 - sparsity`,
    per layer or ranked across all layers, each layer's count rounded to `multiple_of`."""
    if scope == "layer":
        counts = [(1.0 - sparsity) * s.numel() for s in scores]
    else:
        flat = torch.cat(scores)
        keep_total = int(round((1.0 - sparsity) * flat.numel()))
        if keep_total == 0:
            counts = [0.0 for _ in scores]
        else:
            threshold = flat.topk(keep_total).values[-1]
            counts = [float((s >= threshold).sum()) for s in scores]
    kept = []
    for s, c in zip(scores, counts):
        k = round_to_multiple(c, s.numel(), multiple_of)
        kept.append(s.topk(k).indices.sort().values)
    return kept


def block_influence(x: Tensor, y: Tensor) -> Tensor:
    """ShortGPT's block influence: 1 - mean cosine between a block's input and output tokens.
    x, y: (..., hidden) -> scalar; small means the block barely changes its input."""
    cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1]), dim=-1)
    return 1.0 - cos.mean()


def blocks_to_drop(scores: Tensor, count: int) -> list[int]:
    """Indices of the `count` least important blocks (ascending index)."""
    if not 0 <= count < scores.numel():
        raise UserError(f"layers: cannot remove {count} of {scores.numel()} blocks; at least one must stay.")
    return sorted(scores.argsort(stable=True)[:count].tolist())
