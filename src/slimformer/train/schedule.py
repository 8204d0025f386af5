"""Pure schedules and proximal updates for training: learning rate, gradual sparsity, L1 shrinkage."""

from __future__ import annotations

import math

from torch import Tensor

from slimformer.errors import UserError


def lr_at(step: int, base_lr: float, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup` steps, then
    constant or cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise UserError(f"lr schedule must be 'cosine' or 'constant', got {schedule!r}.")
    span = max(total - warmup, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0, start: int = 0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / n)^3, clamped to [t0, t0 + n].

    `total` (n) is the number of steps over which sparsity rises from `initial` to `final`."""
    if total < 1:
        raise UserError(f"gradual pruning needs at least 1 step to ramp sparsity over, got {total}.")
    frac = min(max(step - start, 0), total) / total
    return final + (initial - final) * (1.0 - frac) ** 3


def soft_threshold(w: Tensor, amount: float) -> Tensor:
    """Proximal step of amount * |w|_1: sign(w) * max(|w| - amount, 0), in place; returns `w`."""
    if amount < 0:
        raise UserError(f"soft-threshold amount must be >= 0, got {amount}.")
    shrunk = w.abs().sub_(amount).clamp_(min=0)
    return w.copy_(w.sign().mul_(shrunk))
