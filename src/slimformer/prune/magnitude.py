"""`magnitude`: unstructured pruning of the smallest-|w| weights, per layer or globally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.config import TargetedConfig, check_range
from slimformer.context import StepContext, track
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.prune.magnitude_math import global_masks, layer_masks, threshold_masks
from slimformer.registry import register


@dataclass(frozen=True)
class MagnitudeConfig(TargetedConfig):
    """sparsity: fraction of weights to zero, in [0, 1); or threshold: zero every |w| below it.
    scope: `layer` (each layer loses `sparsity`) or `global` (one ranking across all targets)."""

    sparsity: float | None = None
    threshold: float | None = None
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.threshold is None):
            raise UserError("magnitude: give exactly one of `sparsity` (a ratio in [0, 1)) or `threshold`.")
        if self.sparsity is not None:
            check_range("magnitude: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.threshold is not None and self.threshold < 0:
            raise UserError(f"magnitude: threshold must be >= 0, got {self.threshold}.")


@register("magnitude", MagnitudeConfig, kind="prune")
@torch.no_grad()
def magnitude(model: nn.Module, config: MagnitudeConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Zero the smallest-magnitude weights of the target layers in place; return per-layer sparsity."""
    layers = select_linears(model, config.targets, config.ignore)
    weights = {name: _weight(name, m) for name, m in layers.items()}
    scores = {name: w.abs() for name, w in weights.items()}
    if config.threshold is not None:
        masks = threshold_masks(scores, config.threshold)
    elif config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = {name: layer_masks(s, config.sparsity) for name, s in track(ctx, scores.items(), "magnitude scores", len(scores))}
    per_layer = {}
    for name, w in track(ctx, weights.items(), "magnitude", len(weights)):
        w.mul_(masks[name])
        per_layer[name] = round(1.0 - masks[name].float().mean().item(), 6)
    total = sum(w.numel() for w in weights.values())
    zeros = sum((w == 0).sum().item() for w in weights.values())
    return {"layers": len(layers), "sparsity": zeros / total, "layer_sparsity": per_layer}


def _weight(name: str, module: nn.Module) -> torch.Tensor:
    try:
        return weight_view(module)
    except TypeError:
        raise UserError(f"magnitude: layer '{name}' ({type(module).__name__}) has no dense weight to prune.") from None
