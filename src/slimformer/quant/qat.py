"""`qat`: quantization-aware training. Target linears become `FakeQuantLinear`s initialised from a
PTQ result (RTN, or GPTQ run on a copy of the model), are trained with the distillation loss from
the uncompressed teacher on the training engine's loop, then converted to `QuantLinear`: the same
packed artifact and ONNX export as PTQ.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from slimformer.checkpoint import claim
from slimformer.config import check_positive
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.qat_modules import (
    FakeQuantLinear, convert_qat, quantized_init, rtn_init, swap_in_fake_quant,
)
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import check_scheme
from slimformer.registry import register
from slimformer.train.data import lm_data
from slimformer.train.loop import train
from slimformer.train.losses import check_kd
from slimformer.train.task import TrainConfig, TrainState
from slimformer.train.tasks import DistillTask

__all__ = ["QATConfig", "QATTask", "FakeQuantLinear", "prepare_qat", "convert_qat", "qat"]


@dataclass(frozen=True)
class QATConfig(TrainConfig):
    """bits/group_size/symmetric as in `rtn`. init: the PTQ result training starts from (`rtn`, or
    `gptq` on `num_samples` calibration windows of `seq_len` tokens). lsq: learn the scales (and
    zero points) too, LSQ style; false keeps the PTQ scales fixed and trains the weights only (STE).
    Training (the engine's keys: steps, lr, batch_size, grad_accum, warmup_steps, schedule, ...)
    runs on the same `num_samples` windows with the distillation loss from the uncompressed model:
    temperature, and alpha = weight of the KD term (1 - alpha: the next-token loss)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    init: Literal["rtn", "gptq"] = "gptq"
    lsq: bool = True
    num_samples: int = 64
    temperature: float = 1.0
    alpha: float = 1.0
    seq_len: int = 512  # the calibration windows of docs/design.md, for GPTQ and training alike

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scheme(self.bits, self.group_size, "qat")
        if self.init not in ("rtn", "gptq"):
            raise UserError(f"qat: init must be 'rtn' or 'gptq', got {self.init!r}.")
        check_kd(self.alpha, self.temperature)
        check_positive("qat", self, "num_samples")


def _float_targets(model: nn.Module, config: QATConfig) -> dict[str, nn.Module]:
    layers = select_linears(model, config.targets, config.ignore)
    done = [n for n, m in layers.items() if isinstance(m, (QuantLinear, FakeQuantLinear))]
    if done:
        raise UserError(
            f"qat: {len(done)} target layer(s) are already quantized (e.g. {done[0]}); qat starts from float "
            "layers and runs its own PTQ (init: rtn | gptq): drop the earlier quantization step or `ignore` them."
        )
    return layers


@torch.no_grad()
def prepare_qat(model: nn.Module, config: QATConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Swap the target linears of `model` (in place) for FakeQuantLinears initialised from RTN or
    GPTQ; at this point the model computes exactly the PTQ model. GPTQ runs on a copy and needs
    calibration data in `ctx`. Returns {"layers", "init"} (+ GPTQ's calibration window count)."""
    layers = _float_targets(model, config)
    info: dict[str, Any] = {"layers": len(layers), "init": config.init}
    if config.init == "rtn":
        init = rtn_init(layers, config.bits, config.group_size, config.symmetric)
    else:
        from slimformer.quant.gptq import GPTQConfig, gptq

        shadow = copy.deepcopy(model)
        gptq_config = GPTQConfig(
            bits=config.bits, group_size=config.group_size, symmetric=config.symmetric, targets=config.targets,
            ignore=config.ignore, num_samples=config.num_samples, seq_len=config.seq_len,
        )
        step_ctx = dataclasses.replace(ctx, checkpoint=None, resume=False) if ctx is not None else None
        info["calib_windows"] = gptq(shadow, gptq_config, step_ctx)["calib_windows"]
        init = quantized_init({name: shadow.get_submodule(name) for name in layers})
        del shadow
    swap_in_fake_quant(model, layers, init, lsq=config.lsq)
    return info


class QATTask(DistillTask):
    """The training engine's task for QAT: distillation from the teacher, with `prepare` swapping in
    fake-quantized layers (only their latent weights, biases and scales/zeros train) and `finish`
    converting them to QuantLinear. Weights that were exactly zero (pruned) stay zero."""

    def __init__(self, teacher: nn.Module, config: QATConfig, ctx: StepContext | None) -> None:
        super().__init__(teacher, alpha=config.alpha, temperature=config.temperature)
        self.config, self.ctx = config, ctx
        self.masks: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module) -> nn.Module:
        self.masks = pruned_masks(_float_targets(model, self.config))
        self.init_info = prepare_qat(model, self.config, self.ctx)
        model = super().prepare(model)
        fake = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
        trained = {id(p) for m in fake for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        self._apply_masks(model)
        return model

    def after_step(self, model: nn.Module, state: TrainState) -> None:
        self._apply_masks(model)

    @torch.no_grad()
    def _apply_masks(self, model: nn.Module) -> None:
        for name, keep in self.masks.items():
            latent = model.get_submodule(name).latent
            latent.mul_(keep.to(latent.device))

    def finish(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        model, info = super().finish(model)
        info.pop("layer_map", None)  # one map per block, the identity here
        return model, {**self.init_info, **info, "converted": convert_qat(model)}


def pruned_masks(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{name: keep-mask} for the float layers whose weight has exact zeros (pruned by an earlier step)."""
    masks = {}
    for name, module in layers.items():
        w = weight_view(module)
        if bool((w == 0).any()):
            masks[name] = w != 0
    return masks


@register("qat", QATConfig, stage="quant", placement="model")
def qat(model: nn.Module, config: QATConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Quantization-aware training of the target layers (in place): PTQ init (RTN or GPTQ),
    distillation from the uncompressed model (`ctx.teacher`, else a copy of `model` as it is now),
    then conversion to QuantLinear."""
    if ctx is None or ctx.calib is None or ctx.tokenizer is None:
        raise UserError("qat needs training data (--calib, or calib= in Python) and a tokenizer.")
    # the model before the recipe (only read, under no_grad); called on its own: the model as it is now
    teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model).eval()
    data = lm_data(ctx.tokenizer, ctx.calib, config.seq_len, config.num_samples)
    if ctx.checkpoint is not None and config.checkpoint_every:
        claim(ctx.checkpoint, ctx.fingerprint)
    trained, info = train(model, QATTask(teacher, config, ctx), data, config, checkpoint=ctx.checkpoint,
                          resume=ctx.resume, progress=ctx.progress)
    assert trained is model  # every swap happened in place
    model.eval()
    return {**info, "bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
            "lsq": config.lsq, "train_windows": len(data)}
