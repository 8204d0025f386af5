"""`magnitude`: unstructured or N:M pruning of the smallest-|w| weights, per layer or globally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.calibrate.engine import calibration_inputs
from slimformer.context import StepContext, track
from slimformer.models.layout import select_linears
from slimformer.prune.common import AllocatedConfig, apply_masks, dense_weight, owl_allocation, select_masks, summary
from slimformer.registry import register


@dataclass(frozen=True)
class MagnitudeConfig(AllocatedConfig):
    """sparsity: fraction of weights to zero, in [0, 1); or threshold: zero every |w| below it; or
    pattern: "N:M". scope: `layer` (each layer loses `sparsity`) or `global` (one ranking across all
    targets). allocation: `owl` takes per-block sparsities from the activations (needs calibration)."""

    def __post_init__(self) -> None:
        self.check_amount("magnitude")
        self.check_allocation("magnitude")


@register("magnitude", MagnitudeConfig, stage="prune")
@torch.no_grad()
def magnitude(model: nn.Module, config: MagnitudeConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Zero the smallest-magnitude weights of the target layers in place; return per-layer sparsity."""
    layers = select_linears(model, config.targets, config.ignore)
    weights = {name: dense_weight(name, m, "magnitude") for name, m in layers.items()}
    owl: dict[str, Any] = {}
    if config.allocation == "owl":
        windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "magnitude (allocation: owl)")
        owl = owl_allocation(model, layers, config, windows, ctx, "magnitude")
    scores = {name: w.abs() for name, w in weights.items()}
    masks = select_masks(scores, config, owl.get("layer_sparsity"))
    per_layer = apply_masks(weights, dict(track(ctx, masks.items(), "magnitude", len(masks))))
    owl.pop("layer_sparsity", None)
    return {**summary(weights, per_layer), **owl}
