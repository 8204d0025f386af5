"""Recipe steps that train: `finetune`, `distill`, `gradual` (cubic-schedule magnitude pruning while
fine-tuning) and `l1` (proximal L1 training, then a magnitude prune). All use `train.loop.train`.

Decoders train on LM windows of the calibration data (default: the `lee-news` calibration pool);
encoders on labelled texts (default: `tweets` calibration split) through a temporary linear head
on mean-pooled states that is dropped afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.checkpoint import claim
from slimformer.config import check_range
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears
from slimformer.prune.magnitude_math import global_masks, layer_masks
from slimformer.registry import register
from slimformer.train.data import TrainData, classification_data, lm_data
from slimformer.train.loop import train
from slimformer.train.losses import check_kd
from slimformer.train.schedule import cubic_sparsity, soft_threshold
from slimformer.train.task import TrainConfig, TrainState, TrainTask
from slimformer.train.tasks import DistillTask, SupervisedTask


def recipe_data(ctx: StepContext, options: TrainConfig, labels: bool = True) -> TrainData:
    """Training data of a recipe step: LM windows (decoders) or tokenized texts (encoders)."""
    if ctx.calib is None or ctx.tokenizer is None:
        raise UserError("training steps need data and a tokenizer (run them through slimformer.compress).")
    if ctx.kind == "decoder":
        return lm_data(ctx.tokenizer, ctx.calib, options.seq_len)
    return classification_data(ctx.tokenizer, ctx.calib, max_length=min(options.seq_len, 128), require_labels=labels)


def _supervised(model: nn.Module, data: TrainData, ctx: StepContext) -> SupervisedTask:
    if ctx.kind == "encoder":  # a bare encoder: a temporary head on mean-pooled states
        return SupervisedTask(len(data.classes), int(model.config.hidden_size))
    return SupervisedTask()


def _run(model: nn.Module, task: TrainTask, data: TrainData, options: TrainConfig, ctx: StepContext) -> dict[str, Any]:
    if ctx.checkpoint is not None and options.checkpoint_every:
        claim(ctx.checkpoint, ctx.fingerprint)
    trained, info = train(model, task, data, options, checkpoint=ctx.checkpoint, resume=ctx.resume, progress=ctx.progress,
                          device=ctx.device)
    if trained is not model:  # e.g. after FSDP: copy the gathered weights into the recipe's model
        model.load_state_dict(trained.state_dict())
    return info


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Plain recovery training (next-token or task loss); pruned weights stay zero."""


@register("finetune", FinetuneConfig, stage="train", placement="model")
def finetune(model: nn.Module, config: FinetuneConfig, ctx: StepContext) -> dict[str, Any]:
    """Fine-tune `model` in place on the step's data; returns the training info."""
    data = recipe_data(ctx, config)
    return _run(model, _supervised(model, data, ctx), data, config, ctx)


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """teacher: null (the model before the recipe) or an alias/folder; student: null (the current
    model) or {keep_layers: [...]} / {every: k} (blocks kept from it); alpha: weight of the soft
    loss (1 - alpha: hard labels); temperature; hidden_weight / attention_weight: per-block
    hidden-state MSE and attention KL on mapped blocks."""

    teacher: str | None = None
    student: dict | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0
    attention_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kd(self.alpha, self.temperature)
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise UserError(f"distill: hidden_weight and attention_weight must be >= 0, got {self.hidden_weight} and {self.attention_weight}.")
        if self.student is not None:
            from slimformer.train.student import check_student

            check_student(self.student)  # indices are checked against the model when the step runs


@register("distill", DistillConfig, stage="train", placement="model")
def distill(model: nn.Module, config: DistillConfig, ctx: StepContext) -> dict[str, Any]:
    """Distil `model` (in place; first shrunk to `student` blocks if given) from the teacher."""
    from slimformer.models.layout import find_blocks
    from slimformer.train.student import drop_layers, student_layers

    teacher = _teacher(config, ctx)
    mapping = None
    if config.student is not None:
        n = len(find_blocks(model)[1])
        keep = student_layers(config.student, n)
        drop_layers(model, keep)
        mapping = keep if len(find_blocks(teacher)[1]) == n else None
    data = recipe_data(ctx, config, labels=config.alpha < 1)
    head = len(data.classes) if ctx.kind == "encoder" else 0
    task = DistillTask(teacher, alpha=config.alpha, temperature=config.temperature, hidden_weight=config.hidden_weight,
                       attention_weight=config.attention_weight, student_layers=mapping, n_classes=head,
                       hidden_size=int(model.config.hidden_size))
    info = _run(model, task, data, config, ctx)
    return {**info, "student_layers": len(find_blocks(model)[1])}


def _teacher(config: DistillConfig, ctx: StepContext) -> nn.Module:
    if config.teacher is not None:
        from slimformer.models.loading import load_bundle

        return load_bundle(config.teacher, tokenizer=False).model
    if ctx.teacher is None:
        raise UserError("distill: no teacher: give `teacher: ALIAS_OR_FOLDER`, or run the step in a recipe "
                        "(the teacher is then the model before the recipe).")
    return ctx.teacher


@dataclass(frozen=True)
class GradualConfig(TrainConfig):
    """sparsity: final fraction of zeros per target layer (or overall with scope: global), reached
    by s_t = s_f + (s_i - s_f)(1 - t / n)^3 over the first `ramp` fraction of the steps, magnitude
    masks recomputed every `update_every` steps; the remaining steps fine-tune at that sparsity."""

    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    update_every: int = 10
    ramp: float = 0.75
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gradual: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_range("gradual: initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        check_range("gradual: ramp", self.ramp, 0.0, 1.0)
        if self.update_every < 1:
            raise UserError(f"gradual: update_every must be a positive integer, got {self.update_every}.")


class _Gradual(SupervisedTask):
    """Recomputes magnitude masks of the target layers on the cubic schedule."""

    def __init__(self, base: SupervisedTask, config: GradualConfig, targets: list[str]) -> None:
        super().__init__()
        self.extras = base.extras
        self.config, self.layers = config, targets
        self.ramp_steps = max(1, round(config.ramp * config.steps))

    def _prune(self, model: nn.Module, masks: dict[str, torch.Tensor], sparsity: float) -> None:
        scores = {n: model.get_submodule(n).weight.detach().abs() for n in self.layers}
        if self.config.scope == "global":
            new = global_masks(scores, sparsity)
        else:
            new = {n: layer_masks(s, sparsity) for n, s in scores.items()}
        masks.update(new)
        with torch.no_grad():
            for n, m in new.items():
                model.get_submodule(n).weight.mul_(m)

    def after_step(self, model: nn.Module, state: TrainState) -> None:
        t = state.step
        if t <= self.ramp_steps and (t % self.config.update_every == 0 or t == self.ramp_steps):
            s = cubic_sparsity(t, self.ramp_steps, self.config.sparsity, self.config.initial_sparsity)
            self._prune(model, state.masks, s)


@register("gradual", GradualConfig, stage="train", placement="model")
def gradual(model: nn.Module, config: GradualConfig, ctx: StepContext) -> dict[str, Any]:
    """Prune the target layers gradually to `sparsity` while fine-tuning (in place)."""
    targets = list(select_linears(model, config.targets, config.ignore))
    data = recipe_data(ctx, config)
    task = _Gradual(_supervised(model, data, ctx), config, targets)
    if config.initial_sparsity > 0:
        task._prune(model, {}, config.initial_sparsity)
    info = _run(model, task, data, config, ctx)
    return {**info, **_sparsity(model, targets)}


@dataclass(frozen=True)
class L1Config(TrainConfig):
    """Proximal L1 training: after each step w <- sign(w) max(|w| - lr * l1, 0) on the target layers,
    then a magnitude prune to `sparsity` (per layer, or overall with scope: global)."""

    l1: float = 1e-4
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("l1: sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.l1 < 0:
            raise UserError(f"l1: l1 (the L1 penalty weight) must be >= 0, got {self.l1}.")


class _Proximal(SupervisedTask):
    def __init__(self, base: SupervisedTask, config: L1Config, targets: list[str]) -> None:
        super().__init__()
        self.extras = base.extras
        self.config, self.layers = config, targets

    @torch.no_grad()
    def after_step(self, model: nn.Module, state: TrainState) -> None:
        for n in self.layers:
            soft_threshold(model.get_submodule(n).weight, state.lr * self.config.l1)


@register("l1", L1Config, stage="train", placement="model")
def l1(model: nn.Module, config: L1Config, ctx: StepContext) -> dict[str, Any]:
    """L1 proximal training of the target layers, then a magnitude prune to `sparsity` (in place)."""
    targets = list(select_linears(model, config.targets, config.ignore))
    data = recipe_data(ctx, config)
    info = _run(model, _Proximal(_supervised(model, data, ctx), config, targets), data, config, ctx)
    before = _sparsity(model, targets)["sparsity"]
    _Gradual(SupervisedTask(), GradualConfig(sparsity=config.sparsity, scope=config.scope), targets)._prune(model, {}, config.sparsity)
    return {**info, "sparsity_from_l1": before, **_sparsity(model, targets)}


def _sparsity(model: nn.Module, targets: list[str]) -> dict[str, float]:
    weights = [model.get_submodule(n).weight for n in targets]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"sparsity": round(zeros / sum(w.numel() for w in weights), 6)}
