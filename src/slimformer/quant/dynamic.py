"""`dynamic`: int8 weights (symmetric, per output channel) with activations quantized per token at
run time, executed with real integer matrix products (`torch._int_mm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.config import TargetedConfig
from slimformer.context import StepContext, track
from slimformer.models.layout import select_linears
from slimformer.quant.qlinear import QuantLinear
from slimformer.registry import register


@dataclass(frozen=True)
class DynamicConfig(TargetedConfig):
    """Only the target layers are configurable: the scheme is fixed by the integer kernel
    (8-bit symmetric per-channel weights, 8-bit symmetric per-token activations)."""


@register("dynamic", DynamicConfig, kind="quant")
@torch.no_grad()
def dynamic(model: nn.Module, config: DynamicConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Replace each target layer by an int8 QuantLinear that runs integer matmuls."""
    layers = select_linears(model, config.targets, config.ignore)
    for name, module in track(ctx, layers.items(), "dynamic", len(layers)):
        model.set_submodule(name, QuantLinear.from_float(module, bits=8, group_size=-1, symmetric=True, dynamic=True))
    return {"layers": len(layers), "bits": 8, "activations": "int8 per token, dynamic"}
