"""`smoothquant`: SmoothQuant scale migration, then static W8A8 (as `static`) of the smoothed
layers, on the layer-wise calibration engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.calibrate.collectors import InputObservers
from slimformer.calibrate.engine import calibration_inputs, observe_linears, run_on_targets
from slimformer.config import check_range
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.observers import make_observer
from slimformer.quant.smoothquant_math import ChannelRange, smooth_scales, smoothed_range, weight_absmax
from slimformer.quant.static import StaticConfig, clip_ratio, finish, static_layer
from slimformer.registry import register


@dataclass(frozen=True)
class SmoothQuantConfig(StaticConfig):
    """alpha in [0, 1]: how much of the activation range moves into the weights (0.5 default).
    Other keys as `static` (w_bits, a_bits, w_observer, a_observer, percentile, a_symmetric, ...)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        self.validate("smoothquant")
        try:
            check_range("alpha", self.alpha, 0.0, 1.0)
        except UserError as exc:
            raise UserError(f"smoothquant: {exc}") from None


@register("smoothquant", SmoothQuantConfig, stage="quant", placement="blocks")
@torch.no_grad()
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Smooth and quantize the target layers block by block.

    One s per distinct input: layers fed the same tensor (q/k/v, gate/up) share it, with max|W_j|
    taken over all of them, as in the paper. s is not folded into the preceding RMSNorm/LayerNorm
    (o_proj and down_proj have none): each layer keeps it as `input_scale` and divides its input
    by it before quantizing, which gives the same float result as folding.
    """
    selected = select_linears(model, config.targets, config.ignore)
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "smoothquant")

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        ranges = InputObservers(ChannelRange, "smoothquant")
        observe_linears(block, layers, inputs, ranges)
        groups = ranges.groups(list(layers))
        scales = {
            leader: smooth_scales(ranges.get(leader).absmax(), weight_absmax([weight_view(layers[n]) for n in names]),
                                  config.alpha)
            for leader, names in groups.items()
        }  # leader -> (in,)
        act_ranges, ratios = _smoothed_ranges(block, layers, inputs, ranges, scales, config)
        for leader, names in groups.items():
            for name in names:
                w = weight_view(layers[name]).float() * scales[leader]  # (out, in) W * s
                model.set_submodule(name, static_layer(layers[name], w, act_ranges[leader], config, scales[leader]))
        return {"block": index, "layers": len(layers), "clip_ratios": ratios}

    infos = run_on_targets(model, selected, windows, process, ctx)
    return {**finish(model, selected, infos, windows, config), "alpha": config.alpha}


def _smoothed_ranges(
    block: nn.Module, layers: dict[str, nn.Module], inputs, ranges: InputObservers,
    scales: dict[str, torch.Tensor], config: SmoothQuantConfig,
) -> tuple[dict[str, tuple[float, float]], list[float]]:
    """Activation range of x / s per leader: straight from the channel min/max for `minmax`,
    else from a second pass over the block feeding x / s to the observer."""
    if config.a_observer == "minmax":
        out = {leader: smoothed_range(ranges.get(leader).lo, ranges.get(leader).hi, s) for leader, s in scales.items()}
        return out, [1.0] * len(out)
    observers = InputObservers(lambda: make_observer(config.a_observer, config.percentile), "smoothquant", scales)
    observe_linears(block, layers, inputs, observers)
    out, ratios = {}, []
    for leader in scales:
        observer = observers.get(leader)
        out[leader] = observer.range(config.a_bits, config.a_symmetric)
        ratios.append(clip_ratio(observer, out[leader]))
    return out, ratios
