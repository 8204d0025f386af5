"""`static`: post-training static W8A8 — int weights per output channel plus one calibrated
activation scale per layer input, chosen by an observer on the layer-wise calibration engine.

Each block's inputs are observed after the previous blocks were quantized (weights *and*
activations), so every range is taken on the activations the quantized model really produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.calibrate.collectors import InputObservers
from slimformer.calibrate.engine import calibration_inputs, observe_linears, run_on_targets
from slimformer.config import TargetedConfig
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.observers import (
    OBSERVERS, WEIGHT_OBSERVERS, act_qparams, check_percentile, make_observer, weight_clip_mse,
)
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import check_bits, compute_qparams, quantize
from slimformer.registry import register


@dataclass(frozen=True)
class StaticConfig(TargetedConfig):
    """w_bits/a_bits: weight and activation bits (8/8 runs int8 x int8 matmuls). w_observer:
    per-output-channel symmetric weight range (minmax | mse). a_observer: per-tensor activation
    range (minmax | percentile | mse | kl); percentile in (0, 100]. a_symmetric: symmetric
    activation codes (required for the integer path). num_samples/seq_len: calibration windows."""

    w_bits: int = 8
    a_bits: int = 8
    w_observer: Literal["minmax", "mse"] = "minmax"
    a_observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = 99.99
    a_symmetric: bool = True
    num_samples: int = 64
    seq_len: int = 512

    def __post_init__(self) -> None:
        self.validate("static")

    def validate(self, method: str) -> None:
        """UserError (prefixed with `method`) for any out-of-range key."""
        try:
            check_bits(self.w_bits, "w_bits")
            check_bits(self.a_bits, "a_bits")
            check_percentile(self.percentile)
        except UserError as exc:
            raise UserError(f"{method}: {exc}") from None
        if self.w_observer not in WEIGHT_OBSERVERS:
            raise UserError(f"{method}: unknown w_observer {self.w_observer!r}; expected one of {', '.join(WEIGHT_OBSERVERS)}.")
        if self.a_observer not in OBSERVERS:
            raise UserError(f"{method}: unknown a_observer {self.a_observer!r}; expected one of {', '.join(OBSERVERS)}.")
        for key in ("num_samples", "seq_len"):
            if getattr(self, key) < 1:
                raise UserError(f"{method}: {key} must be a positive integer, got {getattr(self, key)}.")


def static_layer(
    layer: nn.Module, weight: torch.Tensor, act_range: tuple[float, float], config: StaticConfig,
    input_scale: torch.Tensor | None = None,
) -> QuantLinear:
    """A QuantLinear computing `weight` (out, in) per-channel symmetric at w_bits, its input
    quantized with the static range `act_range`; `input_scale` (in,) divides the input first."""
    w = weight.float()
    if config.w_observer == "mse":  # clip each row to its threshold; codes beyond it saturate
        t = weight_clip_mse(w, config.w_bits)  # (out, 1)
        qp = compute_qparams(torch.maximum(torch.minimum(w, t), -t), config.w_bits, -1, True)
    else:
        qp = compute_qparams(w, config.w_bits, -1, True)
    q = QuantLinear.from_codes(quantize(w, qp), qp, getattr(layer, "bias", None), input_scaled=input_scale is not None,
                               act_bits=config.a_bits, act_symmetric=config.a_symmetric)
    scale, zero = act_qparams(*act_range, config.a_bits, config.a_symmetric)
    q.int_kernel = False  # calibration runs later blocks through it: the fast float form (see `finish`)
    q.act_scale.fill_(scale)
    q.act_zero.fill_(zero)
    if input_scale is not None:
        q.input_scale.copy_(input_scale)
    return q


def clip_ratio(observer: Any, act_range: tuple[float, float]) -> float:
    """Chosen range / observed absmax (1.0 = nothing clipped)."""
    peak = max(-observer.lo, observer.hi)
    return max(-act_range[0], act_range[1]) / peak if peak > 0 else 1.0


@register("static", StaticConfig, stage="quant", placement="blocks")
@torch.no_grad()
def static(model: nn.Module, config: StaticConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Quantize the target layers' weights and (static, per tensor) inputs block by block."""
    selected = select_linears(model, config.targets, config.ignore)
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "static")

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        observers = InputObservers(lambda: make_observer(config.a_observer, config.percentile), "static")
        observe_linears(block, layers, inputs, observers)
        ratios = []
        for name, layer in layers.items():
            observer = observers.get(name)
            act_range = observer.range(config.a_bits, config.a_symmetric)
            model.set_submodule(name, static_layer(layer, weight_view(layer), act_range, config))
            ratios.append(clip_ratio(observer, act_range))
        return {"block": index, "layers": len(layers), "clip_ratios": ratios}

    infos = run_on_targets(model, selected, windows, process, ctx)
    return finish(model, selected, infos, windows, config)


def finish(
    model: nn.Module, selected: dict[str, nn.Module], infos: list[dict[str, Any]], windows: torch.Tensor,
    config: StaticConfig,
) -> dict[str, Any]:
    """Switch the new layers to the integer kernel and return the step info (`static`, `smoothquant`).

    During calibration they ran the same integer product as fp32 matmuls: CPU `torch._int_mm`
    was measured ~30x slower than fp32 on this project's AVX2 machine (~4 vs ~120 GOP/s), and the numbers are the same up to fp32 rounding.
    """
    for name in selected:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLinear):
            layer.int_kernel = True
    ratios = [r for i in infos for r in i.get("clip_ratios", [])]
    return {"layers": sum(i.get("layers", 0) for i in infos), "calib_windows": int(windows.shape[0]),
            "w_bits": config.w_bits, "a_bits": config.a_bits, "a_observer": config.a_observer,
            "w_observer": config.w_observer, "mean_act_clip_ratio": round(sum(ratios) / max(1, len(ratios)), 4)}
