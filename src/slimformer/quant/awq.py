"""`awq`: activation-aware per-channel scale search before weight quantization, on the
layer-wise calibration engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.calibrate.collectors import HessianCollector
from slimformer.calibrate.engine import calibration_inputs, observe_linears, run_on_targets
from slimformer.config import TargetedConfig, check_positive
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import find_blocks, select_linears, weight_view
from slimformer.quant.awq_fold import (
    FoldGroup, active_groups, can_fold, fold_groups, fold_scale, joint_search, scaled_moment,
)
from slimformer.quant.awq_math import awq_search, clip_search, output_error
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import (
    ScaleRule, ZeroPoint, check_scheme, compute_qparams, dequantize, fake_quantize, quantize, rule_info,
)
from slimformer.registry import register


@dataclass(frozen=True)
class AWQConfig(TargetedConfig):
    """bits/group_size/symmetric/scale_rule/zero_point as in `rtn`. grid: alpha values tried in
    [0, 1] (grid + 1 of them). duo: also try scales divided by the weight's per-channel magnitude (see awq_math).
    clip: then shrink each group's range where that lowers the output error (AWQ's auto_clip).
    fold: true: the reference AWQ form (awq_fold): layers reading one input share one scale,
    folded into the norm or linear producing that input, so the layers carry no `input_scale` and
    export anywhere (Llama-style blocks only; refused elsewhere); false: each layer searches and
    keeps its own `input_scale` vector (any architecture); "auto" (default): true where the blocks
    and targets allow it, else false, and the step's report says why.
    num_samples/seq_len: calibration windows (default 64 x 512, docs/design.md)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_rule: ScaleRule = "absmax"
    zero_point: ZeroPoint = "int"
    grid: int = 20
    duo: bool = True
    clip: bool = True
    # folded: measured within 0.5% of fold: false on SmolLM2 (docs/quantization.md), and exportable
    fold: bool | Literal["auto"] = "auto"
    num_samples: int = 64
    seq_len: int = 512

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.group_size, "awq", symmetric=self.symmetric, scale_rule=self.scale_rule,
                     zero_point=self.zero_point)
        check_positive("awq", self, "grid", "num_samples", "seq_len")


class _ActivationStats(HessianCollector):
    """The input second moment of each layer (as GPTQ's) plus mean |x| per input channel.

    Tokens are weighted uniformly: unlike GPTQ, weighting the attention-sink token up made AWQ
    worse on SmolLM2 (W4 g128, 8 windows: 34.5 uniform, 35.6 at x16, 35.2 at x128).
    """

    def __init__(self) -> None:
        super().__init__("awq")
        self.abs_sum: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        super().add(name, x)
        total, n = self.abs_sum.get(name, (torch.zeros(x.shape[1], device=x.device), 0))
        self.abs_sum[name] = (total + x.float().abs().sum(0), n + x.shape[0])

    def mean_abs(self, name: str) -> torch.Tensor:
        total, n = self.abs_sum[self.leader(name)]
        return total / n


@register("awq", AWQConfig, stage="quant", placement="blocks")
@torch.no_grad()
def awq(model: nn.Module, config: AWQConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Quantize the target layers with searched per-channel scales, block by block.

    `fold: false`: each layer searches its own scales and keeps them as an `input_scale` vector
    (in_features floats, negligible next to the codes), dividing its dequantized weight by it; that
    works for every layer, but runtimes without a per-input scale cannot run such layers.
    `fold: true`: the reference implementation's form (`awq_fold`), for Llama-style blocks only.
    """
    selected = select_linears(model, config.targets, config.ignore)
    fold, why_not = _fold_mode(model, selected, config.fold)
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "awq")

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        stats = _ActivationStats()
        observe_linears(block, layers, inputs, stats)
        run = _folded_block if fold else _per_layer
        return {"block": index, "layers": len(layers), **run(model, index, block, layers, stats, config)}

    infos = run_on_targets(model, selected, windows, process, ctx)
    alphas = [a for i in infos for a in i.get("alphas", [])]
    ratios = [r for i in infos for r in i.get("ratios", [])]
    n, m = max(1, len(alphas)), max(1, len(ratios))
    out = {"layers": sum(i.get("layers", 0) for i in infos), "calib_windows": int(windows.shape[0]),
           "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric, **rule_info(config),
           "fold": fold, "mean_alpha": round(sum(alphas) / n, 3), "mean_error_vs_rtn": round(sum(ratios) / m, 3),
           "duo_layers": sum(i.get("duo", 0) for i in infos)}
    if fold:  # o_proj under grouped-query attention: quantized with s = 1 (see awq_fold)
        out["unscaled_layers"] = sum(i.get("unscaled", 0) for i in infos)
    if why_not:
        out["fold_auto"] = why_not
    return out


def _fold_mode(model: nn.Module, selected: dict[str, nn.Module], fold: bool | str) -> tuple[bool, str | None]:
    """(fold or not, why "auto" chose not to). `fold: true` refuses unfoldable blocks before any work."""
    if fold is True:
        _check_fold(model, selected)
        return True, None
    if fold is False:
        return False, None
    try:
        _check_fold(model, selected)
    except UserError as error:  # per-layer input scales work everywhere; say why they were used
        return False, f"per-layer input scales: {error}"
    return True, None


def _per_layer(model: nn.Module, index: int, block: nn.Module, layers: dict[str, nn.Module],
               stats: _ActivationStats, config: AWQConfig) -> dict[str, Any]:
    """`fold: false`: every layer its own scales, kept as the QuantLinear's `input_scale`."""
    alphas: list[float] = []
    ratios: list[float] = []
    duos = 0
    for name, layer in layers.items():
        w = weight_view(layer).float()
        h = stats.get(name)
        s, alpha, ratio, duo = awq_search(w, h, stats.mean_abs(name), config.bits, config.group_size,
                                          config.symmetric, config.grid, config.duo, **_rules(config))
        duos += duo
        codes, qp, ratio = _round(w, h, s, ratio, config)
        q = QuantLinear.from_codes(codes, qp, getattr(layer, "bias", None), input_scaled=True)
        q.input_scale.copy_(s)
        model.set_submodule(name, q)
        alphas.append(alpha)
        ratios.append(ratio)
    return {"alphas": alphas, "ratios": ratios, "duo": duos}


def _check_fold(model: nn.Module, selected: dict[str, nn.Module]) -> None:
    """Refuse `fold: true` before any calibration when a block's groups are unknown or split."""
    _, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        targets = _block_paths(block, selected)
        if targets:
            for group in active_groups(fold_groups(block, index), set(targets), index):
                can_fold(block, group, index)


def _block_paths(block: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Path inside `block` -> full name, for the `layers` that live in it."""
    path_of = {id(m): p for p, m in block.named_modules()}
    return {path_of[id(m)]: name for name, m in layers.items() if id(m) in path_of}


def _folded_block(model: nn.Module, index: int, block: nn.Module, layers: dict[str, nn.Module],
                  stats: _ActivationStats, config: AWQConfig) -> dict[str, Any]:
    """`fold: true`: search every group's shared scale on the float weights, fold them all (in
    float: up_proj's and v_proj's rows before they are quantized), then quantize every layer plainly."""
    full = _block_paths(block, layers)
    groups = active_groups(fold_groups(block, index), set(full), index)
    scales: dict[FoldGroup, torch.Tensor] = {}
    alphas: list[float] = []
    duos = unscaled = 0
    for g in groups:
        if not can_fold(block, g, index):
            unscaled += len(g.members)
            continue
        lead = full[g.members[0]]  # the members share one input, hence one set of statistics
        s, alpha, _, duo = joint_search([weight_view(block.get_submodule(m)) for m in g.members], stats.get(lead),
                                        stats.mean_abs(lead), config.bits, config.group_size, config.symmetric,
                                        config.grid, config.duo, **_rules(config))
        scales[g], duos = s, duos + duo
        alphas.append(alpha)
    for g, s in scales.items():
        fold_scale(block, g, s)
    ratios = []
    for g in groups:
        for path in g.members:
            layer = block.get_submodule(path)
            codes, qp, ratio = _round_folded(weight_view(layer).float(), stats.get(full[path]), scales.get(g), config)
            model.set_submodule(full[path], QuantLinear.from_codes(codes, qp, getattr(layer, "bias", None)))
            ratios.append(ratio)
    return {"alphas": alphas, "ratios": ratios, "duo": duos, "unscaled": unscaled}


def _codes(ws: torch.Tensor, h_in: torch.Tensor, config: AWQConfig):
    """Codes and qparams of ws, whose inputs have second moment h_in (clipped with `config.clip`)."""
    clip = None
    if config.clip:
        clip = clip_search(ws, h_in, config.bits, config.group_size, config.symmetric, **_rules(config))
    qp = compute_qparams(ws, config.bits, config.group_size, config.symmetric, clip=clip, **_rules(config))
    return quantize(ws, qp), qp


def _round(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, ratio: float, config: AWQConfig):
    """Codes and qparams of w * s (clipped per group with `config.clip`), and the final output
    error relative to RTN (`ratio` is the scale search's, before clipping)."""
    ws = w * s
    codes, qp = _codes(ws, scaled_moment(h, s), config)  # w*s sees inputs x/s
    if config.clip and config.group_size != 0 and ratio > 0:  # clip_search clips every grouping but per tensor
        plain = fake_quantize(ws, config.bits, config.group_size, config.symmetric, **_rules(config))[0]
        before = output_error(plain / s - w, h).item()
        after = output_error(dequantize(codes, qp) / s - w, h).item()
        ratio = ratio * after / before if before > 0 else ratio
    return codes, qp, ratio


def _round_folded(f: torch.Tensor, h: torch.Tensor, s: torch.Tensor | None, config: AWQConfig):
    """Codes and qparams of a folded weight f (its inputs are x / s, x of second moment h), and its
    output error relative to RTN of the same layer before its input scale (f / s on x)."""
    h_in = scaled_moment(h, s)
    codes, qp = _codes(f, h_in, config)
    g = f if s is None else f / s
    plain = fake_quantize(g, config.bits, config.group_size, config.symmetric, **_rules(config))[0]
    base = output_error(plain - g, h).item()
    err = output_error(dequantize(codes, qp) - f, h_in).item()
    return codes, qp, err / base if base > 0 else 1.0


def _rules(config: AWQConfig) -> dict[str, str]:
    return {"scale_rule": config.scale_rule, "zero_point": config.zero_point}

