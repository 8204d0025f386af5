"""`nf4`, `log2`, `codebook`: nonlinear weight quantization into `LUTLinear` lookup-table layers.

The math lives in `nonlinear_math`; this file validates configs and swaps the target layers.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.config import TargetedConfig
from slimformer.context import StepContext, track
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.lut_linear import LUTLinear
from slimformer.quant.nonlinear_math import (
    absmax_scale, codebook_quantize, log2_levels, nf4_levels, scaled_codes,
)
from slimformer.quant.qscheme import expand_groups
from slimformer.registry import register


def _check_int(method: str, key: str, value: object, low: int, high: int | None = None) -> None:
    """UserError '<method>: <key> must be ...' unless value is an integer in [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        wanted = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise UserError(f"{method}: {key} must be {wanted}, got {value!r}.")


def _check_group_size(method: str, group_size: object) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or not (
        group_size == -1 or group_size > 0
    ):
        raise UserError(
            f"{method}: group_size must be -1 (per output channel) or a positive group size, got {group_size!r}."
        )


@dataclass(frozen=True)
class NF4Config(TargetedConfig):
    """group_size: -1 per output channel, N absmax groups of N inputs (a smaller last group allowed)."""

    group_size: int = 64

    def __post_init__(self) -> None:
        _check_group_size("nf4", self.group_size)


@dataclass(frozen=True)
class Log2Config(TargetedConfig):
    """bits: 2-8 (1 sign bit; levels 0 and +-2^-k, k = 0..2^(bits-1)-2, times an absmax scale).
    group_size: as nf4."""

    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        _check_int("log2", "bits", self.bits, 2, 8)
        _check_group_size("log2", self.group_size)


@dataclass(frozen=True)
class CodebookConfig(TargetedConfig):
    """bits: 1-8 (2^bits centroids). scope: `layer` = one codebook per layer, `rows` = one per
    `rows_per_codebook` output channels. iters: Lloyd iterations after the quantile start.
    group_size: divide each group (-1: output channel, N: N inputs) by its absmax before clustering
    and keep that fp16 scale; null clusters the raw weights. keep_extremes: pin the outer two
    centroids to the data's min and max, so no weight is clipped."""

    bits: int = 4
    scope: Literal["layer", "rows"] = "layer"
    rows_per_codebook: int | None = None
    iters: int = 20
    group_size: int | None = -1
    keep_extremes: bool = True

    def __post_init__(self) -> None:
        _check_int("codebook", "bits", self.bits, 1, 8)
        _check_int("codebook", "iters", self.iters, 1)
        if self.scope not in ("layer", "rows"):
            raise UserError(f"codebook: scope must be 'layer' or 'rows', got {self.scope!r}.")
        if self.scope == "rows":
            _check_int("codebook", "rows_per_codebook (with scope: rows)", self.rows_per_codebook, 1)
        elif self.rows_per_codebook is not None:
            raise UserError("codebook: rows_per_codebook applies only with scope: rows; remove it or set scope: rows.")
        if self.group_size is not None:
            _check_group_size("codebook", self.group_size)
        if self.keep_extremes and self.bits == 1:
            raise UserError("codebook: keep_extremes needs bits >= 2 (both 1-bit centroids would be pinned); "
                            "set keep_extremes: false.")


def _swap(
    model: nn.Module, config: TargetedConfig, ctx: StepContext | None, name: str,
    make: Callable[[torch.Tensor, torch.Tensor | None], LUTLinear],
) -> int:
    """Replace every target layer by make(weight (out, in) fp32, bias) -> LUTLinear; return the count."""
    layers = select_linears(model, config.targets, config.ignore)
    for layer_name, module in track(ctx, layers.items(), name, len(layers)):
        w = weight_view(module).float()
        model.set_submodule(layer_name, make(w, getattr(module, "bias", None)))
    return len(layers)


def _scaled_layer(
    w: torch.Tensor, bias: torch.Tensor | None, levels: torch.Tensor | None, bits: int, group_size: int, method: str,
) -> LUTLinear:
    """Absmax-scaled lookup layer: NF4 when `levels` is given, log2 levels when it is None."""
    scale = absmax_scale(w, group_size)  # (out, n_groups) fp16
    table = log2_levels(bits) if levels is None else levels
    codes = scaled_codes(w, scale, group_size, levels, bits)
    return LUTLinear.from_codes(codes, table.unsqueeze(0), bias, bits=bits, method=method, scale=scale,
                                group_size=group_size)


@register("nf4", NF4Config, stage="quant")
@torch.no_grad()
def nf4(model: nn.Module, config: NF4Config, ctx: StepContext | None = None) -> dict[str, Any]:
    """NormalFloat-4: each weight / its group's absmax goes to the nearest of the 16 NF4 levels."""
    levels = nf4_levels().half().float()  # choose codes against the fp16 values that get stored
    n = _swap(model, config, ctx, "nf4", lambda w, b: _scaled_layer(w, b, levels, 4, config.group_size, "nf4"))
    return {"layers": n, "bits": 4, "group_size": config.group_size}


@register("log2", Log2Config, stage="quant")
@torch.no_grad()
def log2(model: nn.Module, config: Log2Config, ctx: StepContext | None = None) -> dict[str, Any]:
    """Logarithmic quantization: each weight / its group's absmax goes to the nearest of 0, +-2^-k."""
    n = _swap(model, config, ctx, "log2",
              lambda w, b: _scaled_layer(w, b, None, config.bits, config.group_size, "log2"))
    return {"layers": n, "bits": config.bits, "group_size": config.group_size}


@register("codebook", CodebookConfig, stage="quant")
@torch.no_grad()
def codebook(model: nn.Module, config: CodebookConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """k-means codebooks (2^bits fp16 centroids) per layer or per group of output channels."""

    def make(w: torch.Tensor, bias: torch.Tensor | None) -> LUTLinear:
        rows = w.shape[0] if config.scope == "layer" else min(config.rows_per_codebook, w.shape[0])
        scale = None if config.group_size is None else absmax_scale(w, config.group_size)  # (out, n_groups)
        x = w if scale is None else w / expand_groups(scale.float(), w.shape[1], config.group_size)
        tables, codes = codebook_quantize(x, config.bits, config.iters, rows, config.keep_extremes)
        return LUTLinear.from_codes(codes, tables, bias, bits=config.bits, method="codebook", scale=scale,
                                    group_size=config.group_size, rows_per_table=rows)

    n = _swap(model, config, ctx, "codebook", make)
    return {
        "layers": n, "bits": config.bits, "scope": config.scope, "iters": config.iters,
        "group_size": config.group_size, "keep_extremes": config.keep_extremes,
    }
