"""The training task API: what a training step supplies to `train.loop.train` (a `TrainTask`), the
options every training step shares (`TrainConfig`), the state `after_step` sees, and the fixed
sparsity masks the loop keeps (see `slimformer.train` for a worked example)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from slimformer.config import TargetedConfig
from slimformer.errors import UserError
from slimformer.models.layout import all_linears
from slimformer.train import dist


@dataclass(frozen=True)
class TrainConfig(TargetedConfig):
    """Recipe keys shared by every training step.

    steps: optimizer steps; lr: peak learning rate; batch_size: examples per micro-batch per process;
    grad_accum: micro-batches per step (global batch = batch_size x processes x grad_accum);
    seq_len: tokens per LM window; warmup_steps, schedule (cosine | constant), weight_decay,
    max_grad_norm (0: no clipping), seed; checkpoint_every: steps between checkpoints (0: none);
    strategy: ddp | fsdp when launched with torchrun.
    """

    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        name = type(self).__name__.removesuffix("Config").lower()
        for key in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, key) < 1:
                raise UserError(f"{name}: {key} must be a positive integer, got {getattr(self, key)}.")
        for key in ("warmup_steps", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise UserError(f"{name}: {key} must be >= 0, got {getattr(self, key)}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"{name}: lr must be a positive number (e.g. 5e-5), got {self.lr}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError(f"{name}: weight_decay and max_grad_norm must be >= 0, got {self.weight_decay} and {self.max_grad_norm}.")


@dataclass
class TrainState:
    """What `after_step` sees: the step just taken (1-based), its LR, and the keep-masks in force
    ({linear module name: bool tensor shaped like its `weight`})."""

    step: int
    lr: float
    masks: dict[str, Tensor] = field(default_factory=dict)


class TrainTask:
    """What to optimise. Override `loss`; the other hooks default to doing nothing."""

    def __init__(self) -> None:
        self.extras = nn.ModuleDict()  # extra trainable modules (projections, heads)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Called once before training; returns the model to train."""
        return model

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch and named values to log."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, state: TrainState) -> None:
        """Called after every optimizer step, once the fixed masks are re-applied."""

    def finish(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """Called once after training; returns the final model and report info."""
        return model, {}


class TrainModule(nn.Module):
    """The model and the task's extra modules as one module (what DDP/FSDP wrap and checkpoints hold)."""

    def __init__(self, model: nn.Module, task: TrainTask) -> None:
        super().__init__()
        self.model = model
        self.extras = task.extras
        self._task = [task]  # a list: not registered as a submodule

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self._task[0].loss(self.model, batch)


def fixed_masks(model: nn.Module) -> dict[str, Tensor]:
    """Keep-masks of every linear layer that has exact zeros in its weight (pruned weights)."""
    masks = {}
    for name, module in all_linears(model).items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.is_floating_point() and bool((weight == 0).any()):
            masks[name] = weight.detach() != 0
    return masks


@torch.no_grad()
def reapply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the masked-out weights (in place; an FSDP-sharded weight shard by shard)."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        dist.local(weight).mul_(dist.local_part(mask, weight))
