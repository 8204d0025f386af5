"""`wanda`: prune by |w| x ||x|| (Sun et al., 2023) on the layer-wise calibration engine.

Each block is observed on its real inputs (the outputs of the already pruned blocks before it),
its target layers pruned, and its pruned outputs fed to the next block. Weights compete within
their output row, as in the paper; N:M within each group of M inputs of a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.calibrate.collectors import ColumnNorms
from slimformer.calibrate.engine import calibration_inputs, observe_linears, run_on_targets
from slimformer.context import StepContext
from slimformer.models.layout import select_linears
from slimformer.prune.common import AllocatedConfig, apply_masks, dense_weight, layer_mask, owl_allocation, summary
from slimformer.prune.wanda_math import wanda_scores
from slimformer.registry import register


@dataclass(frozen=True)
class WandaConfig(AllocatedConfig):
    """sparsity (per output row), threshold (on |w| x ||x||) or pattern "N:M"; scope: layer only
    (blocks are pruned one at a time); allocation uniform | owl; num_samples x seq_len windows."""

    def __post_init__(self) -> None:
        self.check_amount("wanda", global_ok=False)
        self.check_allocation("wanda")


@register("wanda", WandaConfig, stage="prune", placement="blocks")
@torch.no_grad()
def wanda(model: nn.Module, config: WandaConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Prune the target layers block by block by Wanda scores; return per-layer sparsity."""
    selected = select_linears(model, config.targets, config.ignore)
    for name, m in selected.items():
        dense_weight(name, m, "wanda")  # refuse a quantized layer before any calibration work
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "wanda")
    owl = owl_allocation(model, selected, config, windows, ctx, "wanda") if config.allocation == "owl" else {}
    sparsity_of = owl.pop("layer_sparsity", {})

    def process(index: int, block: nn.Module, inputs, layers: dict[str, nn.Module]) -> dict[str, Any]:
        norms = ColumnNorms("wanda")
        observe_linears(block, layers, inputs, norms)
        # the weights as the block holds them now: a bf16 model's are fp32 copies for this block,
        # rounded back after it, so a tensor taken before the run would be pruned and then dropped
        weights = {name: dense_weight(name, layer, "wanda") for name, layer in layers.items()}
        masks = {name: layer_mask(name, wanda_scores(weights[name], norms.norm(name)), config,
                                  sparsity_of.get(name), per_row=True) for name in layers}
        return {"block": index, "layer_sparsity": apply_masks(weights, masks)}

    infos = run_on_targets(model, selected, windows, process, ctx)
    per_layer = {name: s for info in infos for name, s in info.get("layer_sparsity", {}).items()}
    weights = {name: dense_weight(name, m, "wanda") for name, m in selected.items()}
    return {**summary(weights, per_layer), "calib_windows": int(windows.shape[0]), **owl}
