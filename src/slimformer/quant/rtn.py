"""`rtn`: round-to-nearest weight quantization with min/max scales, any bit width 2-8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.config import TargetedConfig
from slimformer.context import StepContext, track
from slimformer.models.layout import select_linears
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import check_scheme
from slimformer.registry import register


@dataclass(frozen=True)
class RTNConfig(TargetedConfig):
    """bits: 2-8. group_size: -1 per output channel, 0 per tensor, N groups of N inputs (a last
    group smaller when N does not divide the width). symmetric: zero point fixed at 0."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.group_size, "rtn")


@register("rtn", RTNConfig, kind="quant")
@torch.no_grad()
def rtn(model: nn.Module, config: RTNConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Replace each target layer by a QuantLinear holding its round-to-nearest codes."""
    layers = select_linears(model, config.targets, config.ignore)
    for name, module in track(ctx, layers.items(), "rtn", len(layers)):
        model.set_submodule(
            name,
            QuantLinear.from_float(module, bits=config.bits, group_size=config.group_size, symmetric=config.symmetric),
        )
    return {"layers": len(layers), "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric}
