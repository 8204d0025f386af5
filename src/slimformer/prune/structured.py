"""Structured pruning that physically shrinks the model: `heads`, `neurons` and `layers`.

Each step ranks units by importance (see `structured_scores`), chooses which go with the pure
functions of `structured_math`, and slices them out with `models.structure` (smaller nn.Linear
modules, attention attributes and the HF config updated). `targets`/`ignore` choose blocks: a
block's heads are pruned when its attention output projection is selected, its neurons when its
FFN output projection is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from slimformer.calibrate.engine import calibration_inputs
from slimformer.config import TargetedConfig, check_positive, check_range
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import find_blocks, select_linears
from slimformer.models.loading import model_kind
from slimformer.models.structure import BlockParts, block_parts, keep_blocks, keep_heads, keep_neurons, sync_config
from slimformer.prune import structured_scores as scoring
from slimformer.prune.structured_math import blocks_to_drop, choose_heads, choose_neurons, normalize_per_layer
from slimformer.registry import register

# calibration windows when num_samples is not given: the protocol's default (docs/design.md), fewer for the scores
# that cost one forward pass per unit
_DEFAULT_SAMPLES = {"information": 2, "ppl": 8}


@dataclass(frozen=True)
class _Calibrated(TargetedConfig):
    num_samples: int | None = None  # default 64 windows (information: 2, ppl: 8)
    seq_len: int = 512

    def samples(self, score: str) -> int:
        return self.num_samples if self.num_samples is not None else _DEFAULT_SAMPLES.get(score, 64)


@dataclass(frozen=True)
class HeadsConfig(_Calibrated):
    """sparsity: fraction of attention heads removed, in [0, 1), rounded to whole removal units.
    scope: `layer` (each layer loses that fraction) or `global` (one ranking over all layers).
    score: `taylor` (head-gate gradient × gate on calibration data), `magnitude` (weight norms, no
    data), `information` (output KL when the head alone is masked; one pass per head).
    gqa: `groups` removes whole key/value groups with their query heads (smaller k/v too; the
    default: SmolLM2 25% global taylor, ppl 64.5 vs 69.9 for `within`, docs/pruning.md);
    `within` removes the same number of query heads from every key/value group."""

    sparsity: float | None = None
    scope: Literal["layer", "global"] = "layer"
    score: Literal["taylor", "magnitude", "information"] = "taylor"
    gqa: Literal["groups", "within"] = "groups"

    def __post_init__(self) -> None:
        if self.sparsity is None:
            raise UserError("heads: `sparsity` (the fraction of heads to remove, in [0, 1)) is required.")
        check_range("heads: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        _check_samples("heads", self)


@dataclass(frozen=True)
class NeuronsConfig(_Calibrated):
    """sparsity: fraction of FFN intermediate neurons removed, in [0, 1). scope: layer | global.
    score: `activation` (mean |activation| × output-column norm, Wanda-like), `taylor`
    (|activation · gradient| through neuron gates), `magnitude` (weight norms, no data).
    multiple_of: each layer keeps a multiple of this many neurons (faster kernels; 1: exact)."""

    sparsity: float | None = None
    scope: Literal["layer", "global"] = "layer"
    score: Literal["activation", "taylor", "magnitude"] = "activation"
    multiple_of: int = 8

    def __post_init__(self) -> None:
        if self.sparsity is None:
            raise UserError("neurons: `sparsity` (the fraction of neurons to remove, in [0, 1)) is required.")
        check_range("neurons: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_positive("neurons", self, "multiple_of")
        _check_samples("neurons", self)


@dataclass(frozen=True)
class LayersConfig(_Calibrated):
    """num_layers: blocks to remove; or sparsity: the fraction of blocks removed (rounded).
    score: `cosine` (ShortGPT block influence: 1 - cosine of block input and output) or `ppl`
    (calibration loss with the block skipped; one pass per block)."""

    num_layers: int | None = None
    sparsity: float | None = None
    score: Literal["cosine", "ppl"] = "cosine"

    def __post_init__(self) -> None:
        if (self.num_layers is None) == (self.sparsity is None):
            raise UserError("layers: give exactly one of `num_layers` (blocks to remove) or `sparsity` (a fraction in [0, 1)).")
        if self.sparsity is not None:
            check_range("layers: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.num_layers is not None and self.num_layers < 0:
            raise UserError(f"layers: num_layers must be >= 0, got {self.num_layers}.")
        if self.targets or self.ignore:
            raise UserError("layers: removes whole blocks; `targets`/`ignore` do not apply to it.")
        _check_samples("layers", self)


def _check_samples(method: str, config: _Calibrated) -> None:
    check_positive(method, config, "seq_len")
    if config.num_samples is not None:
        check_positive(method, config, "num_samples")


def _kind(model: nn.Module, ctx: StepContext | None) -> str:
    return ctx.kind if ctx is not None else model_kind(model.config)


def _chosen(model: nn.Module, parts: list[BlockParts], config: TargetedConfig, role: str) -> list[int]:
    """Indices of the blocks whose `role` layer the targets/ignore patterns select."""
    selected = {id(m) for m in select_linears(model, config.targets, config.ignore).values()}
    chosen = [p.index for p in parts if id(p.get(role)) in selected]
    if not chosen:
        raise UserError(f"targets/ignore select no block's {parts[0].path(role)}: nothing to prune.")
    return chosen


def _unit_scores(
    model: nn.Module, parts: list[BlockParts], config: "HeadsConfig | NeuronsConfig", ctx: StepContext | None, unit: str
) -> list[torch.Tensor]:
    """Per-block importance of each head or neuron (`unit`), by `config.score`; magnitude needs no data."""
    if config.score == "magnitude":
        return scoring.magnitude_head_scores(parts) if unit == "heads" else scoring.magnitude_neuron_scores(parts)
    windows = calibration_inputs(ctx, config.samples(config.score), config.seq_len, unit)
    if config.score == "taylor":
        return scoring.taylor_scores(model, parts, unit, windows, _kind(model, ctx), ctx)
    if config.score == "information":
        return scoring.information_scores(model, parts, windows, _kind(model, ctx), ctx)
    return scoring.activation_neuron_scores(model, parts, windows, ctx)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("heads", HeadsConfig, stage="prune", placement="model")
def heads(model: nn.Module, config: HeadsConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Remove the least important attention heads (q/k/v rows and o columns) in place."""
    parts = block_parts(model, "heads")
    chosen = _chosen(model, parts, config, "o")
    before = _params(model)
    scores = _unit_scores(model, parts, config, ctx, "heads")
    picked = [scores[i] for i in chosen]
    if config.scope == "global" and config.score != "information":  # information is already model-wide
        picked = normalize_per_layer(picked)
    total = sum(parts[i].heads for i in chosen)
    removed = choose_heads(picked, [parts[i].kv_heads for i in chosen], config.sparsity, config.scope, config.gqa)
    with torch.no_grad():
        for i, gone in zip(chosen, removed):
            if gone:
                keep_heads(parts[i], sorted(set(range(parts[i].heads)) - set(gone)))
    sync_config(model)
    n_removed = sum(len(g) for g in removed)
    return {
        "heads_removed": n_removed, "heads_sparsity": round(n_removed / total, 6),
        "removed_heads": {str(i): g for i, g in zip(chosen, removed) if g},
        "params_before": before, "params_after": _params(model), "structure": _sizes(model),
    }


@register("neurons", NeuronsConfig, stage="prune", placement="model")
def neurons(model: nn.Module, config: NeuronsConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Remove the least important FFN intermediate neurons (input rows, output columns) in place."""
    parts = block_parts(model, "neurons")
    chosen = _chosen(model, parts, config, "mlp_out")
    before = _params(model)
    scores = _unit_scores(model, parts, config, ctx, "neurons")
    keep = choose_neurons([scores[i] for i in chosen], config.sparsity, config.scope, config.multiple_of)
    total = sum(parts[i].intermediate for i in chosen)
    with torch.no_grad():
        for i, kept in zip(chosen, keep):
            if len(kept) < parts[i].intermediate:
                keep_neurons(parts[i], kept)
    sync_config(model)
    n_kept = sum(len(k) for k in keep)
    return {
        "neurons_removed": total - n_kept, "neurons_sparsity": round(1 - n_kept / total, 6),
        "params_before": before, "params_after": _params(model), "structure": _sizes(model),
    }


@register("layers", LayersConfig, stage="prune", placement="model")
def layers(model: nn.Module, config: LayersConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Remove the least important whole blocks in place (ShortGPT-style), renumbering the rest."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    count = config.num_layers if config.num_layers is not None else int(round(config.sparsity * n))
    if count >= n:
        raise UserError(f"layers: asked to remove {count} of the model's {n} blocks; at least one must stay.")
    before = _params(model)
    windows = calibration_inputs(ctx, config.samples(config.score), config.seq_len, "layers")
    if config.score == "cosine":
        scores: Tensor = scoring.cosine_block_scores(model, windows, ctx)
    else:
        scores = scoring.skip_block_scores(model, blocks, windows, _kind(model, ctx), ctx)
    dropped = blocks_to_drop(scores, count)
    keep_blocks(model, [i for i in range(n) if i not in set(dropped)])
    _sync_if_known(model)
    return {
        "layers_removed": dropped, "layer_scores": [round(float(s), 6) for s in scores],
        "params_before": before, "params_after": _params(model), "layers_after": n - count,
    }


def _sync_if_known(model: nn.Module) -> None:
    try:
        sync_config(model)
    except UserError:  # a family without head/neuron layout: num_hidden_layers is already set
        pass


def _sizes(model: nn.Module) -> list[dict[str, int]]:
    return [p.sizes() for p in block_parts(model)]
