"""Gradients for scores computed by backward passes (Taylor/gradient pruning, structured gates,
mixed-precision Fisher): only the tensors a method scores require gradients while it runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def only_trainable(model: nn.Module, params: Iterable[nn.Parameter] = (), eval_mode: bool = False) -> Iterator[None]:
    """Within the block, `params` require gradients and every other parameter of `model` is frozen
    (eval_mode: and the model runs in eval mode, no dropout). Afterwards every flag and the mode are
    restored and the model's gradients are cleared."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        if eval_mode:
            model.eval()
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(training)
