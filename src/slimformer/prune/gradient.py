"""`gradient` and `taylor`: prune by |dL/dw| or |w * dL/dw| accumulated over calibration windows.

The loss is the language-model loss for decoders. Encoders have no labels and, like MiniLM, often
no MLM head, so they use a label-free proxy: half the mean squared norm of the last hidden state
(`gradient_math.output_energy`), whose gradient measures how much each weight feeds the output.

Memory: only the target weights require gradients, and each one's gradient is folded into its fp32
score by a post-accumulate hook and freed at once, so the extra memory is one fp32 score per target
weight plus the activations of one window's backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimformer.calibrate.engine import calibration_inputs
from slimformer.config import check_positive
from slimformer.context import StepContext, track
from slimformer.errors import UserError
from slimformer.models.grads import only_trainable
from slimformer.models.layout import select_linears
from slimformer.prune.common import ScoreConfig, apply_masks, dense_weight, select_masks, summary
from slimformer.prune.gradient_math import Criterion, accumulate_score, output_energy
from slimformer.registry import register


@dataclass(frozen=True)
class GradientConfig(ScoreConfig):
    """sparsity, threshold (on the score) or pattern "N:M"; scope layer | global. num_samples x
    seq_len: calibration windows, one forward + backward pass each. Default 16 x 512, not the
    engine's 64: a backward pass costs about two forwards and the scores settle with fewer windows."""

    num_samples: int = 16
    seq_len: int = 512
    criterion: ClassVar[Criterion] = "gradient"

    def __post_init__(self) -> None:
        self.check_amount(self.criterion)
        check_positive(self.criterion, self, "num_samples", "seq_len")


@dataclass(frozen=True)
class TaylorConfig(GradientConfig):
    """As `gradient`, scoring |w * dL/dw| (first-order Taylor estimate of the loss change)."""

    criterion: ClassVar[Criterion] = "taylor"


def importance_scores(model: nn.Module, layers: dict[str, nn.Module], windows: torch.Tensor, criterion: Criterion,
                      kind: str, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
    """Mean per-window |g| or |w g| for each layer's weight, (out, in) fp32."""
    params = {name: m.weight for name, m in layers.items()}
    scores = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in params.items()}
    handles = []
    with only_trainable(model, params.values()):
        try:
            for name, p in params.items():
                def fold(param: torch.Tensor, _name: str = name) -> None:
                    accumulate_score(scores[_name], param.data, param.grad, criterion, windows.shape[0])
                    param.grad = None
                handles.append(p.register_post_accumulate_grad_hook(fold))
            with torch.enable_grad():
                for window in track(ctx, windows, criterion, windows.shape[0]):
                    loss = _score_loss(model, window.unsqueeze(0), kind)
                    if not torch.isfinite(loss):
                        raise UserError(f"{criterion}: the calibration loss is not finite (NaN/inf); check the model "
                                        "and data.")
                    loss.backward()
        finally:
            for h in handles:
                h.remove()
    # Conv1D keeps its weight as (in, out): scores follow the (out, in) view used for masks
    return {name: s if isinstance(layers[name], nn.Linear) else s.t() for name, s in scores.items()}


def _score_loss(model: nn.Module, ids: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss whose weight gradients are scored: the LM loss (decoders), or for encoders, which
    have no labels, `output_energy` (how much each weight feeds the output's magnitude)."""
    mask = torch.ones_like(ids)
    if kind == "decoder":
        return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    return output_energy(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def _prune(model: nn.Module, config: GradientConfig, ctx: StepContext | None) -> dict[str, Any]:
    method = config.criterion
    layers = select_linears(model, config.targets, config.ignore)
    weights = {name: dense_weight(name, m, method) for name, m in layers.items()}
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, method)
    kind = ctx.kind if ctx is not None else "decoder"
    scores = importance_scores(model, layers, windows, method, kind, ctx)
    with torch.no_grad():
        per_layer = apply_masks(weights, select_masks(scores, config))
    return {**summary(weights, per_layer), "calib_windows": int(windows.shape[0])}


@register("gradient", GradientConfig, stage="prune", placement="model")
def gradient(model: nn.Module, config: GradientConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Prune the weights with the smallest mean |dL/dw| over the calibration windows."""
    return _prune(model, config, ctx)


@register("taylor", TaylorConfig, stage="prune", placement="model")
def taylor(model: nn.Module, config: TaylorConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Prune the weights with the smallest mean |w * dL/dw| over the calibration windows."""
    return _prune(model, config, ctx)
