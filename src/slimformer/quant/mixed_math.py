"""Mixed precision math: per-layer sensitivity scores and the bit allocation under a size budget.

Sensitivity of layer l at b bits is the second-order estimate of the loss increase when only that
layer is quantized, with the diagonal (empirical) Fisher information F standing in for the Hessian:
    dL_l(b) ~ 1/2 sum_i F_i (w_i - q_b(w_i))^2,   F_i = mean over windows of (dL/dw_i)^2.
The allocation picks one bit width per layer minimising sum_l dL_l(b_l) subject to
sum_l cost_l(b_l) <= budget, a multiple-choice knapsack solved by Lagrangian relaxation
(bisection on the price of a bit) and a greedy top-up of what the relaxation leaves unspent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.quant.qscheme import fake_quantize


def fisher_sensitivity(w: Tensor, fisher: Tensor, bits: int, group_size: int, symmetric: bool) -> float:
    """1/2 sum F (w - q(w))^2 for one layer's weight w (out, in) and its Fisher diagonal (same shape)."""
    dw = fake_quantize(w.float(), bits, group_size, symmetric)[0] - w.float()
    return 0.5 * float((fisher * dw.pow(2)).sum())


def layer_cost_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits the artifact stores for one quantized layer: codes + an fp16 scale and a `bits`-bit zero per group."""
    groups_per_row = 1 if group_size <= 0 else -(-in_features // group_size)
    n_groups = 1 if group_size == 0 else out_features * groups_per_row
    return out_features * in_features * bits + n_groups * (16 + bits)


def allocate_bits(scores: Tensor, costs: Tensor, budget: float, iters: int = 60) -> Tensor:
    """Choose one option per layer: scores/costs (layers, options); returns option indices (layers,).

    Minimises scores.sum over the chosen options with costs.sum <= budget. Raises ValueError if even
    the cheapest choice for every layer exceeds the budget.
    """
    rows = torch.arange(scores.shape[0])
    cheapest = costs.argmin(dim=1)
    if costs[rows, cheapest].sum() > budget:
        raise ValueError("budget below the cheapest allocation")

    def pick(price: float) -> Tensor:
        return (scores + price * costs).argmin(dim=1)

    # bisection on the price of one bit: at a high price every layer takes its cheapest option
    low, high = 0.0, 1.0
    while costs[rows, pick(high)].sum() > budget:
        high *= 4
    if costs[rows, pick(low)].sum() <= budget:
        return pick(low)
    for _ in range(iters):
        mid = (low + high) / 2
        if costs[rows, pick(mid)].sum() > budget:
            low = mid
        else:
            high = mid
    choice = pick(high)
    return _top_up(scores, costs, budget, choice)


def _top_up(scores: Tensor, costs: Tensor, budget: float, choice: Tensor) -> Tensor:
    """Spend what is left greedily: the upgrade with the best score drop per extra bit that fits."""
    rows = torch.arange(scores.shape[0])
    choice = choice.clone()
    while True:
        spare = budget - costs[rows, choice].sum()
        gain = scores[rows, choice].unsqueeze(1) - scores  # (layers, options) score drop of switching
        extra = costs - costs[rows, choice].unsqueeze(1)
        ok = (gain > 0) & (extra <= spare)
        if not ok.any():
            return choice
        ratio = torch.where(ok, gain / extra.clamp(min=1e-9), torch.full_like(gain, -1.0))
        flat = int(ratio.argmax())
        choice[flat // scores.shape[1]] = flat % scores.shape[1]
