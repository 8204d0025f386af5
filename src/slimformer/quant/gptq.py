"""`gptq`: Hessian-aware weight quantization on the layer-wise calibration engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.calibrate import SharedInputs, observe_linears, run_on_targets
from slimformer.config import TargetedConfig, check_positive
from slimformer.context import StepContext
from slimformer.data.windows import calibration_windows
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.gptq_math import accumulate_hessian, gptq_quantize
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import ScaleRule, ZeroPoint, check_scheme, rule_info
from slimformer.registry import register


@dataclass(frozen=True)
class GPTQConfig(TargetedConfig):
    """bits/group_size/symmetric/scale_rule/zero_point as in `rtn`. damp: fraction of the mean
    Hessian diagonal added for stability. act_order: quantize columns by decreasing activation energy.
    scale_search: choose each group's range shrink (1.0 down to 0.8) by the Hessian-diagonal-weighted
    error, llama.cpp's importance-matrix rule (groups, without act_order). num_samples and
    seq_len: calibration windows (default 64 x 512, docs/design.md)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_rule: ScaleRule = "absmax"
    zero_point: ZeroPoint = "int"
    damp: float = 0.01
    act_order: bool = False
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
        if self.scale_search and (self.act_order or self.group_size <= 0):
            raise UserError("gptq: scale_search chooses each group's scale as GPTQ reaches it; it needs "
                            "group_size > 0 and act_order: false.")


def calibration_inputs(ctx: StepContext | None, num_samples: int, seq_len: int, method: str) -> torch.Tensor:
    """Calibration windows (n, seq_len) from the step context; UserError if there is no data."""
    if ctx is None or ctx.calib is None or ctx.tokenizer is None:
        raise UserError(f"{method} needs calibration data (--calib, or calib= in Python) and a tokenizer.")
    return calibration_windows(ctx.tokenizer, ctx.calib, num_samples, seq_len)


class HessianCollector(SharedInputs):
    """`on_input` callback accumulating H = 2/n sum w_t x_t x_t^T per layer.

    The first token of every window is an attention sink: all later queries attend to it, so an
    error in its outputs (above all v_proj's) is added into every position. With uniform token
    weights GPTQ trades that one token's error for the other 511 and perplexity gets worse than
    plain rounding (SmolLM2 v_proj alone, W4 g128: 34.1 vs RTN 29.2); weighting it `sink_weight`
    times fixes that (28.4). Layers fed the very same tensor one after another (q/k/v, gate/up)
    share one Hessian instead of recomputing it.
    """

    def __init__(self, method: str, seq_len: int | None = None, sink_weight: float = 1.0) -> None:
        super().__init__(method)
        self.seq_len, self.sink_weight = seq_len, sink_weight
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        h, n = self.sums.get(name, (None, 0))
        self.sums[name] = accumulate_hessian(h, x, n, self._weights(x.shape[0]))

    def _weights(self, tokens: int) -> torch.Tensor | None:
        if self.seq_len is None or self.sink_weight == 1.0 or tokens % self.seq_len:
            return None
        w = torch.ones(tokens // self.seq_len, self.seq_len)
        w[:, 0] = self.sink_weight
        return w.reshape(-1)

    def get(self, name: str) -> torch.Tensor:
        return self.sums[self.leader(name)][0]


@register("gptq", GPTQConfig, kind="quant")
@torch.no_grad()
def gptq(model: nn.Module, config: GPTQConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Quantize the target layers block by block, each against the Hessian of its real inputs."""
    selected = select_linears(model, config.targets, config.ignore)
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "gptq")

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        hessians = HessianCollector("gptq", windows.shape[1], config.sink_weight)
        observe_linears(block, layers, inputs, hessians)
        for name, layer in layers.items():
            codes, qp = gptq_quantize(
                weight_view(layer).float(), hessians.get(name), config.bits, config.group_size, config.symmetric,
                damp=config.damp, block_size=config.block_size, act_order=config.act_order,
                scale_rule=config.scale_rule, zero_point=config.zero_point, scale_search=config.scale_search,
            )
            model.set_submodule(name, QuantLinear.from_codes(codes, qp, getattr(layer, "bias", None)))
        return {"block": index, "layers": len(layers)}

    infos = run_on_targets(model, selected, windows, process, ctx)
    return {"layers": sum(i.get("layers", 0) for i in infos), "calib_windows": int(windows.shape[0]),
            "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric, **rule_info(config)}
