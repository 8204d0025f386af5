"""`gptq`: Hessian-aware weight quantization on the layer-wise calibration engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.calibrate.collectors import HessianCollector
from slimformer.calibrate.engine import calibration_inputs, observe_linears, run_on_targets
from slimformer.config import TargetedConfig, check_positive
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.gptq_math import gptq_factor, gptq_quantize
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import ScaleRule, ZeroPoint, check_scheme, rule_info
from slimformer.registry import register


@dataclass(frozen=True)
class GPTQConfig(TargetedConfig):
    """bits/group_size/symmetric/scale_rule/zero_point as in `rtn`. damp: fraction of the mean
    Hessian diagonal added for stability. act_order (default on, as in llm-compressor's "static"):
    quantize columns by decreasing activation energy, group scales from the original weights; it
    measured lower perplexity in every W3/W4 cell of docs/quantization.md. scale_search: choose each
    group's scale (and float minimum) by the Hessian-diagonal-weighted error among ranges of 1.15 down
    to 0.8 times the group's and their least-squares refits, llama.cpp's importance-matrix rule
    (groups only). num_samples and
    seq_len: calibration windows (default 64 x 512, docs/design.md)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_rule: ScaleRule = "absmax"
    zero_point: ZeroPoint = "int"
    damp: float = 0.01
    act_order: bool = True
    scale_search: bool = False
    block_size: int = 128
    sink_weight: float = 128.0
    num_samples: int = 64
    seq_len: int = 512

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.group_size, "gptq", symmetric=self.symmetric, scale_rule=self.scale_rule,
                     zero_point=self.zero_point)
        if not 0 < self.damp < 1:
            raise UserError(f"gptq: damp must be in (0, 1), got {self.damp}.")
        if self.sink_weight < 1:
            raise UserError(f"gptq: sink_weight must be >= 1 (1 = no extra weight), got {self.sink_weight}.")
        check_positive("gptq", self, "block_size", "num_samples", "seq_len")
        if self.scale_search and self.group_size <= 0:
            raise UserError("gptq: scale_search chooses a range shrink per group; it needs group_size > 0.")


@register("gptq", GPTQConfig, stage="quant", placement="blocks")
@torch.no_grad()
def gptq(model: nn.Module, config: GPTQConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Quantize the target layers block by block, each against the Hessian of its real inputs."""
    selected = select_linears(model, config.targets, config.ignore)
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "gptq")

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        hessians = HessianCollector("gptq", windows.shape[1], config.sink_weight)
        observe_linears(block, layers, inputs, hessians)
        last = hessians.last_users(list(layers))
        for name in list(layers):
            factor = hessians.shared(name, lambda h: gptq_factor(h, config.damp, config.act_order))
            h_diag = torch.diag(hessians.get(name))  # all the walk needs of H once it has the factor
            if last[hessians.leader(name)] == name:
                hessians.release(name)
            codes, qp = gptq_quantize(
                weight_view(layers[name]).float(), h_diag, config.bits, config.group_size, config.symmetric,
                damp=config.damp, block_size=config.block_size, act_order=config.act_order,
                scale_rule=config.scale_rule, zero_point=config.zero_point, scale_search=config.scale_search,
                factor=factor,
            )
            quantized = QuantLinear.from_codes(codes, qp, getattr(layers[name], "bias", None))
            model.set_submodule(name, quantized)
            layers[name] = selected[name] = quantized  # the float layer is freed now, not with the block
        return {"block": index, "layers": len(layers)}

    infos = run_on_targets(model, selected, windows, process, ctx)
    return {"layers": sum(i.get("layers", 0) for i in infos), "calib_windows": int(windows.shape[0]),
            "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric, **rule_info(config)}
