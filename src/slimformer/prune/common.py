"""What the score-based pruning methods share: the amount keys (`sparsity` | `threshold` |
`pattern`, `scope`), per-layer allocation (`uniform` | `owl`), mask selection and application."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.calibrate.collectors import ColumnNorms
from slimformer.calibrate.engine import observe_linears, run_on_targets
from slimformer.config import TargetedConfig, check_positive, check_range
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import weight_view
from slimformer.prune.magnitude_math import global_masks, layer_masks, threshold_masks
from slimformer.prune.nm_math import check_divides, nm_masks, parse_pattern, row_masks
from slimformer.prune.wanda_math import outlier_ratio, owl_sparsities, wanda_scores


@dataclass(frozen=True)
class ScoreConfig(TargetedConfig):
    """How much to prune, one of: sparsity (fraction in [0, 1)), threshold (prune scores below it),
    pattern ("N:M": keep N of every M consecutive weights along the input). scope: `layer` (each
    layer loses `sparsity`) or `global` (one ranking across all targets; sparsity only)."""

    sparsity: float | None = None
    threshold: float | None = None
    pattern: str | int | None = None  # int only to explain YAML's reading of an unquoted 2:4 (below)
    scope: Literal["layer", "global"] = "layer"

    def check_amount(self, method: str, *, threshold_ok: bool = True, global_ok: bool = True) -> None:
        """UserError unless exactly one amount key is given, valid, and allowed for `method`."""
        given = [k for k in ("sparsity", "threshold", "pattern") if getattr(self, k) is not None]
        allowed = "`sparsity` or `pattern`" if not threshold_ok else "`sparsity`, `threshold` or `pattern`"
        if len(given) != 1:
            raise UserError(f"{method}: give exactly one of {allowed} (e.g. sparsity: 0.5 or pattern: \"2:4\"), "
                            f"got {', '.join(given) or 'none'}.")
        if self.sparsity is not None:
            check_range(f"{method}: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.threshold is not None:
            if not threshold_ok:
                raise UserError(f"{method}: `threshold` is not supported; give `sparsity` or `pattern`.")
            if self.threshold < 0:
                raise UserError(f"{method}: threshold must be >= 0, got {self.threshold}.")
        if isinstance(self.pattern, int):
            raise UserError(f"{method}: pattern must be a quoted string such as \"2:4\"; got the number "
                            f"{self.pattern} (YAML reads an unquoted 2:4 as the base-60 number 124).")
        if self.pattern is not None:
            try:
                parse_pattern(self.pattern)
            except UserError as exc:
                raise UserError(f"{method}: {exc}") from None
        if self.scope == "global" and (self.pattern is not None or not global_ok):
            why = "meaningless with `pattern` (N:M is per group)" if global_ok else "not supported (each layer is pruned on its own)"
            raise UserError(f"{method}: scope: global is {why}; use scope: layer.")


@dataclass(frozen=True)
class AllocatedConfig(ScoreConfig):
    """ScoreConfig plus per-block sparsity allocation. allocation: `uniform` (every layer the same)
    or `owl` (outlier-weighted: blocks whose Wanda scores hold more values above owl_m x their mean
    get less sparsity, within sparsity +- owl_lambda, the parameter-weighted mean kept at `sparsity`).
    num_samples, seq_len: calibration windows (for `owl`, and for data-driven methods)."""

    allocation: Literal["uniform", "owl"] = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    num_samples: int = 64
    seq_len: int = 512

    def check_allocation(self, method: str) -> None:
        check_positive(method, self, "num_samples", "seq_len")
        if self.owl_m <= 0:
            raise UserError(f"{method}: owl_m (outliers are scores above owl_m x mean) must be > 0, got {self.owl_m}.")
        check_range(f"{method}: owl_lambda", self.owl_lambda, 0.0, 0.5)
        if self.allocation == "owl" and (self.sparsity is None or self.scope != "layer"):
            raise UserError(f"{method}: allocation: owl sets per-block sparsities, so it needs `sparsity` and "
                            "scope: layer (not `threshold`, `pattern` or scope: global).")


def dense_weight(name: str, module: nn.Module, method: str) -> torch.Tensor:
    """The (out, in) weight view of a target layer; UserError for layers without one (quantized)."""
    try:
        return weight_view(module)
    except TypeError:
        raise UserError(f"{method}: layer '{name}' ({type(module).__name__}) has no dense weight to prune "
                        "(prune before quantizing).") from None


def layer_mask(name: str, scores: torch.Tensor, config: ScoreConfig, sparsity: float | None = None,
               per_row: bool = False) -> torch.Tensor:
    """Keep-mask of one layer from its scores (out, in): N:M, threshold, or `sparsity` (default the
    config's) removed per layer or, with per_row, per output row."""
    if config.pattern is not None:
        return nm_masks(scores, *check_divides(config.pattern, scores.shape[1], name))
    if config.threshold is not None:
        return scores >= config.threshold
    sparsity = config.sparsity if sparsity is None else sparsity
    return row_masks(scores, sparsity) if per_row else layer_masks(scores, sparsity)


def select_masks(scores: dict[str, torch.Tensor], config: ScoreConfig, sparsities: dict[str, float] | None = None,
                 per_row: bool = False) -> dict[str, torch.Tensor]:
    """Keep-masks for all layers: one global ranking (scope global) or `layer_mask` per layer, with
    per-layer sparsities when given (OWL)."""
    if config.scope == "global" and config.sparsity is not None:
        return global_masks(scores, config.sparsity)
    if config.threshold is not None:
        return threshold_masks(scores, config.threshold)
    return {name: layer_mask(name, s, config, (sparsities or {}).get(name), per_row) for name, s in scores.items()}


def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero the pruned weights in place; return each layer's resulting fraction of zeros."""
    out = {}
    for name, w in weights.items():
        w.mul_(masks[name].to(w.dtype))
        out[name] = round(float((w == 0).float().mean()), 6)
    return out


def summary(weights: dict[str, torch.Tensor], per_layer: dict[str, float]) -> dict[str, Any]:
    """Step info: layer count, overall fraction of zeros, per-layer fractions."""
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return {"layers": len(weights), "sparsity": zeros / total, "layer_sparsity": per_layer}


def owl_allocation(model: nn.Module, selected: dict[str, nn.Module], config: AllocatedConfig,
                   windows: torch.Tensor, ctx: StepContext | None, method: str) -> dict[str, Any]:
    """OWL's first pass: run the unpruned model block by block, measure each block's Wanda-score
    outlier ratio, and turn the ratios into per-layer sparsities. Returns {"layer_sparsity": {name:
    s}, "block_sparsity": [...], "outlier_ratio": [...]}."""
    ratios: list[float] = []
    params: list[int] = []
    members: list[list[str]] = []

    def observe(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        norms = ColumnNorms(method)
        observe_linears(block, layers, inputs, norms)
        scores = [wanda_scores(dense_weight(n, m, method), norms.norm(n)) for n, m in layers.items()]
        ratios.append(outlier_ratio(scores, config.owl_m))
        params.append(sum(s.numel() for s in scores))
        members.append(list(layers))
        return {}

    plain = dataclasses.replace(ctx, checkpoint=None, resume=False) if ctx is not None else None
    run_on_targets(model, selected, windows, observe, plain)
    block_s = owl_sparsities(torch.tensor(ratios), torch.tensor(params, dtype=torch.float64), config.sparsity,
                             config.owl_lambda)
    per_layer = {name: float(s) for names, s in zip(members, block_s) for name in names}
    return {"layer_sparsity": per_layer, "block_sparsity": [round(float(s), 5) for s in block_s],
            "outlier_ratio": [round(r, 5) for r in ratios]}
