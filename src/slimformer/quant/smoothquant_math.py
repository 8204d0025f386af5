"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

A few input channels of LLM activations are 10-100x larger than the rest, which ruins a
per-tensor activation scale. Dividing channel j of x by s_j and multiplying column j of W by s_j
leaves x W^T unchanged, and s_j = max|X_j|^alpha / max|W_j|^(1-alpha) balances the two ranges
(alpha = 1 moves everything into the weights, 0 nothing). Pure tensor functions; the model
walking lives in `smoothquant.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChannelRange:
    """Running per-input-channel min and max of (tokens, in) batches."""

    def __init__(self) -> None:
        self.lo: Tensor | None = None  # (in,)
        self.hi: Tensor | None = None

    def update(self, x: Tensor) -> None:
        lo, hi = x.amin(dim=0).float(), x.amax(dim=0).float()  # (in,)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def absmax(self) -> Tensor:
        assert self.lo is not None and self.hi is not None, "no data observed"
        return torch.maximum(-self.lo, self.hi)


def weight_absmax(weights: list[Tensor]) -> Tensor:
    """max |W_ij| over the rows of every (out_k, in) weight sharing one input -> (in,)."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smooth_scales(act_absmax: Tensor, w_absmax: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), (in,); dead channels (either max 0) get s = 1."""
    a, w = act_absmax.float(), w_absmax.float()
    s = a.clamp(min=eps).pow(alpha) / w.clamp(min=eps).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def smooth(x: Tensor, w: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(x / s, W * s) for x (..., in), W (out, in), s (in,): the same product, rebalanced ranges."""
    return x / s, w * s


def smoothed_range(lo: Tensor, hi: Tensor, s: Tensor) -> tuple[float, float]:
    """Min and max of x / s over all channels, from the per-channel min/max of x (s > 0)."""
    return float((lo / s).min()), float((hi / s).max())
