"""First-order importance scores: gradient |dL/dw| and Taylor |w * dL/dw|, accumulated over
calibration batches. Pure tensor functions; the model walking lives in `gradient.py`.

Each batch's score is taken in absolute value before it is added: the full-data gradient of a
trained model is close to zero (it sits near a minimum), while per-batch gradients still say how
much the loss reacts to each weight. |w * g| is the first-order estimate of the loss change when w
is set to zero (Molchanov et al., 2019), |g| its sensitivity alone.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Criterion = Literal["gradient", "taylor"]


def batch_score(w: Tensor, g: Tensor, criterion: Criterion) -> Tensor:
    """One batch's score, w's shape, fp32: |g| (gradient) or |w * g| (taylor)."""
    g = g.detach().float()
    return g.abs() if criterion == "gradient" else (w.detach().float() * g).abs()


def accumulate_score(total: Tensor, w: Tensor, g: Tensor, criterion: Criterion, batches: int) -> None:
    """total += batch_score / batches, in place (fp32): the mean over `batches` calibration batches."""
    total.add_(batch_score(w, g, criterion), alpha=1.0 / batches)


def output_energy(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Label-free loss for encoders: half the mean squared L2 norm of the last hidden states
    (batch, T, d) over real tokens. Its gradient says how much each weight feeds the output."""
    energy = 0.5 * hidden.float().pow(2).sum(dim=-1)  # (batch, T)
    if mask is None:
        return energy.mean()
    mask = mask.to(energy.dtype)
    return (energy * mask).sum() / mask.sum()
