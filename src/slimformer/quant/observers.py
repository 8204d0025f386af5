"""Calibration observers: streaming statistics of activations that choose a quantization range.

Each observer is fed batches with `update(x)` and answers `range(bits, symmetric) -> (lo, hi)`;
`act_qparams` turns a range into a per-tensor (scale, zero). All are pure tensor code:
- `minmax`: the running min and max.
- `percentile`: the p-th percentile of |x| (symmetric) or the (100-p)-th / p-th percentiles of x
  (asymmetric), from a bounded uniform sample of the values seen (exact while fewer than
  `max_sample` values were seen).
- `mse`: the clipping ratio of the min/max range (grid of `grid` ratios) that minimises the mean
  squared quantization error, evaluated on a histogram (2048 bins per sign) of the values.
- `kl`: TensorRT-style entropy calibration: a 2048-bin histogram of |x| (its range doubles, merging
  bin pairs, when a larger value arrives), and the threshold whose 2^(b-1)-level quantized histogram
  Q is closest to the clipped reference P in KL(P || Q).
Histograms rather than samples for mse/kl: a sample of a few hundred thousand values misses the
rare outliers (one token in 512) that decide the range, and costs more per grid point.
Weights are observed whole: `weight_clip_mse` picks a clipping threshold per output channel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimformer.errors import UserError
from slimformer.quant.qscheme import qrange

OBSERVERS = ("minmax", "percentile", "mse", "kl")
WEIGHT_OBSERVERS = ("minmax", "mse")


def check_percentile(p: float) -> None:
    """UserError unless 0 < p <= 100."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise UserError(f"percentile must be in (0, 100], got {p!r}.")


def act_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """Per-tensor (scale, zero point) for the range [lo, hi]; the range always includes 0."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        scale = max(hi, -lo) / qmax
        return (scale if scale > 0 else 1.0), 0
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0:
        return 1.0, qmin
    return scale, int(min(max(round(qmin - lo / scale), qmin), qmax))


class MinMaxObserver:
    """Running min and max of everything seen."""

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, x: Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        if self.lo > self.hi:
            raise RuntimeError("observer saw no data")
        return self.lo, self.hi


class _SampleObserver(MinMaxObserver):
    """Min/max plus a bounded uniform sample of the values (all of them while they fit)."""

    def __init__(self, max_sample: int = 1 << 20, seed: int = 0) -> None:
        super().__init__()
        self.max_sample = max_sample
        self.sample = torch.empty(0)
        self.seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor) -> None:
        super().update(x)
        x = x.detach().reshape(-1).float()
        total = self.seen + x.numel()
        if total <= self.max_sample:
            self.sample = torch.cat([self.sample, x])
        else:  # keep each part in proportion to how many values it stands for
            n_old = round(self.max_sample * self.seen / total)
            old = self.sample[torch.randperm(self.sample.numel(), generator=self._gen)[:n_old]]
            new = x[torch.randint(x.numel(), (self.max_sample - n_old,), generator=self._gen)]
            self.sample = torch.cat([old, new])
        self.seen = total


class PercentileObserver(_SampleObserver):
    """Clips the (100 - p)% of values farthest out: |x| for symmetric, each tail's half otherwise."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        check_percentile(percentile)
        super().__init__(**kwargs)
        self.p = float(percentile) / 100

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        s = self.sample
        if symmetric:
            t = _kth(s.abs(), math.ceil(round(self.p * s.numel(), 6)))
            return -t, t
        below = math.floor(round((1 - self.p) / 2 * s.numel(), 6))  # values left below lo in each tail
        return _kth(s, below + 1), _kth(s, s.numel() - below)


def _kth(x: Tensor, k: int) -> float:
    """The k-th smallest value of x (1-based, clamped to 1..n); kthvalue has no 2^24 size limit,
    unlike torch.quantile."""
    return float(x.kthvalue(min(max(k, 1), x.numel())).values)


class _HistogramObserver(MinMaxObserver):
    """Min/max plus histograms of |x| for x >= 0 and x < 0, `bins` bins each over [0, top].

    When a larger |x| arrives, the range doubles k times and every 2^k neighbouring bins merge:
    the bins nest, so nothing is approximated beyond the coarser resolution.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.pos = torch.zeros(bins, dtype=torch.float64)
        self.neg = torch.zeros(bins, dtype=torch.float64)
        self.top = 0.0

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1).float()
        super().update(x)
        peak = max(-self.lo, self.hi)
        if self.top == 0.0:
            self.top = peak if peak > 0 else 1.0
        elif peak > self.top:
            k = min(math.ceil(math.log2(peak / self.top)), int(math.log2(self.bins)))
            self.pos, self.neg = self._merge(self.pos, k), self._merge(self.neg, k)
            self.top *= 2**k
        idx = (x.abs() * (self.bins / self.top)).long().clamp_(max=self.bins - 1)  # (n,) bin of |x|
        counts = torch.bincount(idx + self.bins * (x < 0).long(), minlength=2 * self.bins).double()
        self.pos += counts[: self.bins]
        self.neg += counts[self.bins :]

    def _merge(self, hist: Tensor, k: int) -> Tensor:
        merged = hist.view(-1, 2**k).sum(1)  # (bins / 2^k,)
        return torch.cat([merged, torch.zeros(self.bins - merged.numel(), dtype=torch.float64)])


class MSEObserver(_HistogramObserver):
    """The min/max range shrunk by the ratio (on a grid) giving the least expected quantization
    MSE: clipping error from the histogram plus step^2 / 12 rounding noise per value kept.

    The rounding term is not read off the bin centres: on heavy tails the whole bulk of the
    values can sit in a handful of bins, and their centres say nothing about the rounding error.
    """

    def __init__(self, grid: int = 200, min_ratio: float = 0.01, bins: int = 2048) -> None:
        super().__init__(bins)
        self.grid, self.min_ratio = grid, min_ratio

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        qmin, qmax = qrange(bits, symmetric)
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.top / self.bins)  # (bins,)
        values = torch.cat([centres, -centres]).view(1, -1)  # (1, 2 bins)
        counts = torch.cat([self.pos, self.neg]).view(1, -1)
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if symmetric:
            lo, hi = -max(hi, -lo), max(hi, -lo)
        r = torch.linspace(self.min_ratio, 1.0, self.grid, dtype=torch.float64).view(-1, 1)  # (grid, 1)
        step = r * (hi - lo) / (qmax - qmin)  # (grid, 1)
        kept = torch.minimum(torch.maximum(values, r * lo), r * hi)  # (grid, 2 bins)
        inside = (kept == values).double()
        err = (((values - kept) ** 2 + inside * step**2 / 12) * counts).sum(dim=1)  # (grid,)
        best = float(r[int(err.argmin())])
        return self.lo * best, self.hi * best


class KLObserver(_HistogramObserver):
    """Entropy calibration on the histogram of |x| (2048 bins by default)."""

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        t = kl_threshold(self.pos + self.neg, self.top, levels=2 ** (bits - 1))
        return (-t, t) if symmetric else (max(self.lo, -t), min(self.hi, t))


def kl_threshold(hist: Tensor, top: float, levels: int = 128, candidates: int = 256) -> float:
    """The |x| threshold minimising KL(P || Q) (TensorRT entropy calibration).

    hist: (bins,) counts of |x| over [0, top]. For each candidate i (bins kept), P = hist[:i] with
    the clipped mass added to its last bin; Q merges P into `levels` chunks and spreads each
    chunk's mass evenly over its non-empty bins. About `candidates` evenly spaced i are tried.
    """
    hist = hist.double()
    bins = hist.numel()
    used = int(torch.nonzero(hist).max()) + 1 if bool(hist.any()) else bins
    if used <= levels:
        return top * used / bins
    best_i, best_kl = used, math.inf
    stride = max(1, (used - levels) // candidates)
    for i in range(levels, used + 1, stride):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")  # (i,) level of each bin
        nonzero = (hist[:i] > 0).double()
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nonzero)
        q = torch.where(nonzero > 0, mass[chunk] / count[chunk].clamp(min=1), torch.zeros_like(p))
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return top * best_i / bins


def _kl(p: Tensor, q: Tensor) -> float:
    """KL(P || Q) of two unnormalised histograms; bins where P > 0 and Q = 0 get a tiny Q."""
    p, q = p / p.sum(), q / q.sum().clamp(min=1e-30)
    keep = p > 0
    return float((p[keep] * (p[keep] / q[keep].clamp(min=1e-12)).log()).sum())


def make_observer(name: str, percentile: float = 99.99):
    """An activation observer by name; UserError for unknown names."""
    if name == "minmax":
        return MinMaxObserver()
    if name == "percentile":
        return PercentileObserver(percentile)
    if name == "mse":
        return MSEObserver()
    if name == "kl":
        return KLObserver()
    raise UserError(f"unknown activation observer {name!r}; expected one of {', '.join(OBSERVERS)}.")


def weight_clip_mse(w: Tensor, bits: int, grid: int = 50, min_ratio: float = 0.3) -> Tensor:
    """Per output channel threshold (out, 1) in (0, max|w_row|] minimising the symmetric
    round-trip MSE of that row, searched on a grid of ratios of max|w_row|."""
    w = w.float()
    qmin, qmax = qrange(bits, True)
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (out, 1)
    best_t, best_err = amax.clone(), torch.full_like(amax, math.inf)
    for r in torch.linspace(min_ratio, 1.0, grid).tolist():
        t = amax * r
        s = t / qmax
        err = ((torch.round(w / s).clamp(qmin, qmax) * s - w) ** 2).sum(dim=1, keepdim=True)  # (out, 1)
        better = err < best_err
        best_t, best_err = torch.where(better, t, best_t), torch.where(better, err, best_err)
    return best_t
