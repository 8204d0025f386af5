"""Nonlinear (lookup-table) weight quantization math on tensors: NF4, log2 and 1-D k-means.

Every quantizer returns integer codes (out, in) int16 indexing a table of at most 2^bits values:
- NF4 (QLoRA): 16 fixed levels in [-1, 1] with an exact zero, times an absmax scale per group.
- log2: levels 0 and +-2^-k, k = 0..2^(bits-1) - 2 (1 sign bit), times an absmax scale per group.
- k-means: 2^bits centroids per table learned by Lloyd iterations; no scale.
Groups run along the input dimension as in `qscheme` (-1 = one per output channel, N > 0 = groups
of N inputs with a smaller last group). Scales and tables are fp16, and codes are chosen against
the fp16 values actually stored, so a saved layer computes exactly what was measured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimformer.errors import UserError
from slimformer.quant.qscheme import _ceil_fp16, _grouped, expand_groups

# QLoRA's offset: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), so the outermost quantiles stay finite
_NF4_OFFSET = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
# log2 rounding: m goes up to 2^-k when m >= 0.75 * 2^-k (the arithmetic midpoint to 2^-(k+1))
_LOG2_NEAREST = math.log2(4 / 3)


def nf4_levels() -> Tensor:
    """The 16 NormalFloat-4 levels, ascending, fp32, exactly -1, 0 and 1 at indices 0, 7 and 15.

    Normal quantiles at 8 evenly spaced probabilities in [0.5, offset] for the positive half (0
    included) and 7 in (0.5, offset] for the negative half, each half scaled to a maximum of 1:
    asymmetric, so that zero is represented exactly with 16 values.
    """
    pos = torch.special.ndtri(torch.linspace(0.5, _NF4_OFFSET, 9, dtype=torch.float64)[1:])  # (8,)
    neg = torch.special.ndtri(torch.linspace(0.5, _NF4_OFFSET, 8, dtype=torch.float64)[1:])  # (7,)
    levels = torch.cat([-neg.flip(0) / neg[-1], torch.zeros(1, dtype=torch.float64), pos / pos[-1]])
    return levels.float()


def log2_levels(bits: int) -> Tensor:
    """The 2^bits - 1 log2 levels ascending, fp32: -1, -1/2, ..., -2^-K, 0, 2^-K, ..., 1/2, 1."""
    k_max = 2 ** (bits - 1) - 2
    mags = torch.pow(2.0, -torch.arange(k_max + 1, dtype=torch.float32))  # (K+1,) 1, 1/2, ... 2^-K
    return torch.cat([-mags, torch.zeros(1), mags.flip(0)])


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest entry of ascending `levels` (n,) for every element of x, int64."""
    midpoints = (levels[1:] + levels[:-1]) / 2  # (n-1,)
    return torch.bucketize(x, midpoints)


def log2_codes(x: Tensor, bits: int) -> Tensor:
    """Codes into `log2_levels(bits)` for x already divided by its scale (|x| <= 1), int64.

    Rounding happens on the exponent: k = ceil(-log2(|x|) - log2(4/3)), so |x| moves up to 2^-k
    exactly when it is at least 3/4 of it, i.e. past the linear midpoint between 2^-(k+1) and 2^-k
    (rounding the exponent to nearest would split at the geometric midpoint and miss the nearest
    level for |x| between 0.707 and 0.75 of a power of two). Below half the smallest level: 0.
    """
    k_max = 2 ** (bits - 1) - 2
    mag = x.abs()
    k = torch.ceil(-torch.log2(mag) - _LOG2_NEAREST).clamp(0, k_max)  # -log2(0) = inf: clamped
    zero = mag < 2.0 ** (-k_max - 1)
    # ascending layout: -2^-k at index k, 0 at K+1, +2^-k at 2K+2-k
    code = torch.where(x < 0, k, 2 * k_max + 2 - k)
    return torch.where(zero, torch.full_like(code, k_max + 1), code).long()


def absmax_scale(w: Tensor, group_size: int) -> Tensor:
    """Per-group max |w|, rounded up to fp16 (so |w / s| <= 1 stays true), (out, n_groups) fp16."""
    if group_size == -1:
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    else:
        amax = _grouped(w.abs(), group_size, 0.0).amax(dim=-1)  # (out, n_groups); 0 padding is harmless
    if bool((amax > 65504.0).any()):
        raise UserError(f"weights up to {float(amax.max()):.3g} exceed the fp16 range of the scales.")
    return _ceil_fp16(amax)


def scaled_codes(w: Tensor, scale: Tensor, group_size: int, levels: Tensor | None, bits: int) -> Tensor:
    """Codes (out, in) int16 for w / scale: nearest of `levels`, or log2 codes when levels is None."""
    x = w.float() / expand_groups(scale.float(), w.shape[1], group_size)  # (out, in), |x| <= 1
    codes = log2_codes(x, bits) if levels is None else nearest_level(x, levels)
    return codes.to(torch.int16)


def kmeans_1d(x: Tensor, k: int, iters: int, keep_extremes: bool = False) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the scalars of each row of x (T, n): (centroids (T, k) fp16 ascending, codes (T, n)).

    Centroids start at the (i + 0.5) / k quantiles. In 1-D every cluster is an interval of the
    sorted values, so after one sort an iteration is a search of the centroid midpoints in the
    sorted row (cluster bounds) and a difference of prefix sums (cluster sums): O(k log n), not
    O(n), per iteration, with the same result as assigning and averaging every weight. An empty
    cluster keeps its centroid. keep_extremes pins the first and last centroid to each row's min
    and max, so no weight is clipped. The final codes are nearest to the fp16-rounded centroids.
    """
    x = x.float().contiguous()
    t_rows, n = x.shape
    xs = x.sort(dim=1).values  # (T, n)
    csum = torch.cat([xs.new_zeros(t_rows, 1, dtype=torch.float64), xs.double().cumsum(dim=1)], dim=1)  # (T, n+1)
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp(max=n - 1)
    c = xs[:, pos]  # (T, k) quantile start, ascending
    ends = torch.stack([xs[:, 0], xs[:, -1]], dim=1)  # (T, 2)
    for _ in range(iters):
        if keep_extremes:
            c = torch.cat([ends[:, :1], c[:, 1:-1], ends[:, 1:]], dim=1)
        # values <= a midpoint go to the lower cluster, as bucketize does below
        cuts = torch.searchsorted(xs, (c[:, 1:] + c[:, :-1]) / 2, right=True)  # (T, k-1)
        edges = torch.cat([cuts.new_zeros(t_rows, 1), cuts, cuts.new_full((t_rows, 1), n)], dim=1)  # (T, k+1)
        counts = edges.diff(dim=1)  # (T, k)
        sums = csum.gather(1, edges[:, 1:]) - csum.gather(1, edges[:, :-1])  # (T, k)
        means = (sums / counts.clamp(min=1)).float()
        c = torch.where(counts > 0, means, c).sort(dim=1).values  # empty clusters may break the order
    if keep_extremes:
        c = torch.cat([ends[:, :1], c[:, 1:-1], ends[:, 1:]], dim=1)
    c16 = c.half().sort(dim=1).values
    codes = torch.searchsorted((c16[:, 1:].float() + c16[:, :-1].float()) / 2, x)  # (T, n) nearest
    return c16, codes


def codebook_quantize(
    w: Tensor, bits: int, iters: int, rows_per_table: int, keep_extremes: bool = False
) -> tuple[Tensor, Tensor]:
    """k-means codebooks for a (out, in) weight, one per `rows_per_table` output rows (the last
    table may cover fewer rows): (tables (n_tables, 2^bits) fp16, codes (out, in) int16)."""
    out_f, in_f = w.shape
    full = out_f // rows_per_table * rows_per_table  # rows in whole groups
    parts = []
    if full:
        parts.append(w[:full].reshape(full // rows_per_table, rows_per_table * in_f))
    if full < out_f:
        parts.append(w[full:].reshape(1, -1))
    results = [kmeans_1d(p, 2**bits, iters, keep_extremes) for p in parts]  # at most two calls: whole groups, remainder
    tables = torch.cat([r[0] for r in results])
    codes = torch.cat([r[1].reshape(-1, in_f) for r in results])
    return tables, codes.to(torch.int16)
