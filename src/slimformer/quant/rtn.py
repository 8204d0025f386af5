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
from slimformer.quant.qscheme import ScaleRule, ZeroPoint, check_scheme, rule_info
from slimformer.registry import register


@dataclass(frozen=True)
class RTNConfig(TargetedConfig):
    """bits: 2-8. group_size: -1 per output channel, 0 per tensor, N groups of N inputs (a last
    group smaller when N does not divide the width). symmetric: zero point fixed at 0.
    scale_rule (symmetric only): absmax, d = max|w| / (2^(b-1) - 1); or signed_max, llama.cpp's
    Q4_0/Q5_0 rule d = (the largest-|w| element, sign kept) / -2^(b-1), which uses all 2^b codes.
    zero_point (asymmetric only): int, an integer zero point with the range widened to include 0;
    or float, llama.cpp's Q4_1/Q5_1 rule d = (max - min) / (2^b - 1) with a float minimum m = min."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_rule: ScaleRule = "absmax"
    zero_point: ZeroPoint = "int"

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.group_size, "rtn", symmetric=self.symmetric, scale_rule=self.scale_rule,
                     zero_point=self.zero_point)


@register("rtn", RTNConfig, stage="quant")
@torch.no_grad()
def rtn(model: nn.Module, config: RTNConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Replace each target layer by a QuantLinear holding its round-to-nearest codes."""
    layers = select_linears(model, config.targets, config.ignore)
    for name, module in track(ctx, layers.items(), "rtn", len(layers)):
        model.set_submodule(
            name,
            QuantLinear.from_float(module, bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                                   scale_rule=config.scale_rule, zero_point=config.zero_point),
        )
    return {"layers": len(layers), "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
            **rule_info(config)}
