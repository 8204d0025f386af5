"""The one training loop every training step uses (see `slimformer.train` for the task API).

AdamW, linear warmup then cosine or constant LR, gradient accumulation, gradient clipping, a fixed
seed, fixed sparsity masks, DDP/FSDP under torchrun, and checkpoints that a resumed run continues
from with bit-identical results (the data order and the dropout seed are functions of the step, so
no random state needs saving).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimformer.config import TargetedConfig
from slimformer.errors import UserError
from slimformer.models.layout import all_linears
from slimformer.train import dist
from slimformer.train.data import TrainData, micro_batches
from slimformer.train.schedule import lr_at


@dataclass(frozen=True)
class TrainOptions(TargetedConfig):
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
        name = type(self).__name__.removesuffix("Config").removesuffix("Options").lower()
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
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the masked-out weights (in place)."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask.to(model.get_submodule(name).weight.device))


def train(model: nn.Module, task: TrainTask, data: TrainData, options: TrainOptions, *,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` with `task` on `data` for `options.steps` steps; returns (model, info).

    Under torchrun, every rank calls this with the same arguments; rank 0 alone writes checkpoints
    (FSDP: each rank also writes its own optimizer shard)."""
    distributed = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    dev = dist.device()
    if resume and checkpoint is None:
        raise UserError("resume needs a checkpoint folder (an --output folder for the recipe).")
    model = task.prepare(model)
    module = TrainModule(model, task).to(dev)
    masks = {k: v.to(dev) for k, v in fixed_masks(model).items()}
    start = 0
    found = _latest(checkpoint) if resume and checkpoint is not None else None
    if found is not None:
        start, masks = _load_weights(found, module, dev)
    fsdp = distributed and world > 1 and options.strategy == "fsdp"
    template = copy.deepcopy(module).cpu() if fsdp else None
    wrapped = dist.wrap(module, options.strategy)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise UserError("training found no trainable parameter (every parameter has requires_grad=False).")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if found is not None:
        optimizer.load_state_dict(torch.load(_optim_path(found, fsdp, rank), weights_only=True, map_location=dev))
    state = TrainState(start, 0.0, masks)
    curve: list[float] = []
    t0 = time.perf_counter()
    wrapped.train()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        bar = tqdm(range(start, options.steps), desc="train", disable=not (progress and rank == 0), unit="step")
        for step in bar:
            torch.manual_seed(options.seed * 1_000_003 + step * 1_009 + rank)  # dropout: a function of the step
            lr = lr_at(step, options.lr, options.steps, options.warmup_steps, options.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _step(wrapped, optimizer, data, step, options, rank, world, dev, masks, fsdp)
            state.step, state.lr = step + 1, lr
            with _full_params(wrapped, fsdp):
                apply_masks(module.model, state.masks)
                task.after_step(module.model, state)
            masks = state.masks
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint is not None and options.checkpoint_every and (step + 1) % options.checkpoint_every == 0:
                _save(checkpoint, step + 1, wrapped, module, template, optimizer, state.masks, fsdp, rank)
    wrapped.eval()
    if fsdp:
        template.load_state_dict(_state_dict(wrapped, module, fsdp))
        module = template
    model = module.model.cpu().eval()
    model, info = task.finish(model)
    return model, {"steps": options.steps, "resumed_from": start, "world_size": world,
                   "global_batch": options.batch_size * world * options.grad_accum,
                   "loss_first": round(curve[0], 5) if curve else None, "loss_last": round(curve[-1], 5) if curve else None,
                   "train_wall_s": round(time.perf_counter() - t0, 2), **info}


def _step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData, step: int, options: TrainOptions,
          rank: int, world: int, dev: torch.device, masks: dict[str, Tensor], fsdp: bool) -> float:
    """One optimizer step over this rank's micro-batches; returns the mean loss over all ranks."""
    batches = micro_batches(data, step, options.batch_size, options.grad_accum, rank, world, options.seed)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=dev)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
        with ctx:
            loss, _ = wrapped({k: v.to(dev) for k, v in batch.items()})
            if not torch.isfinite(loss):
                raise UserError(f"training loss became {loss.item()} at step {step + 1}; lower lr (now {options.lr}).")
            (loss / len(batches)).backward()
        total += loss.detach() / len(batches)
    if not fsdp:
        _mask_grads(wrapped, masks)
    if options.max_grad_norm > 0:
        if fsdp:
            wrapped.clip_grad_norm_(options.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.grad is not None], options.max_grad_norm)
    optimizer.step()
    if world > 1:
        torch.distributed.all_reduce(total)
        total /= world
    return float(total)


def _mask_grads(wrapped: nn.Module, masks: dict[str, Tensor]) -> None:
    model = _inner(wrapped).model
    for name, mask in masks.items():
        grad = model.get_submodule(name).weight.grad
        if grad is not None:
            grad.mul_(mask)


def _inner(wrapped: nn.Module) -> TrainModule:
    return wrapped.module if not isinstance(wrapped, TrainModule) else wrapped


def _full_params(wrapped: nn.Module, fsdp: bool) -> contextlib.AbstractContextManager:
    if not fsdp:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(wrapped, writeback=True)


def _state_dict(wrapped: nn.Module, module: TrainModule, fsdp: bool) -> dict[str, Tensor]:
    """The full (unsharded) TrainModule state on CPU."""
    if not fsdp:
        return module.state_dict()
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, cfg):
        return wrapped.state_dict()


# ---- checkpoints: <folder>/step_<n>/{model.safetensors, masks.safetensors, optimizer*.pt, state.json}

def _latest(folder: Path) -> Path | None:
    done = sorted(p for p in Path(folder).glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def _optim_path(folder: Path, fsdp: bool, rank: int) -> Path:
    return folder / (f"optimizer.rank{rank}.pt" if fsdp else "optimizer.pt")


def _save(folder: Path, step: int, wrapped: nn.Module, module: TrainModule, template: nn.Module | None,
          optimizer: torch.optim.Optimizer, masks: dict[str, Tensor], fsdp: bool, rank: int) -> None:
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    target = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp"
    state = _state_dict(wrapped, module, fsdp)  # collective under FSDP: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if fsdp:
        torch.save(optimizer.state_dict(), _optim_path(tmp, fsdp, rank))
    if rank == 0:
        holder = template if template is not None else module
        if template is not None:
            template.load_state_dict(state)
        save_model(holder.cpu() if template is not None else holder, str(tmp / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        if not fsdp:
            torch.save(optimizer.state_dict(), _optim_path(tmp, fsdp, rank))
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": dist.world_size(), "fsdp": fsdp}))
    dist.barrier()
    if rank == 0:
        os.replace(tmp, target)
        for old in folder.glob("step_*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_weights(found: Path, module: TrainModule, dev: torch.device) -> tuple[int, dict[str, Tensor]]:
    """Restore weights from checkpoint `found`; returns (steps done, masks)."""
    from safetensors.torch import load_file, load_model

    meta = json.loads((found / "state.json").read_text())
    if meta.get("world_size", 1) != dist.world_size() and meta.get("fsdp"):
        raise UserError(f"checkpoint '{found}' was written by {meta['world_size']} FSDP processes; resume with the same number.")
    try:
        load_model(module, str(found / "model.safetensors"), strict=True, device=str(dev))
    except RuntimeError as exc:
        raise UserError(f"checkpoint '{found}' does not fit this model ({str(exc)[:200]}); delete it or run without --resume.") from None
    masks = {k: v.to(dev) for k, v in load_file(str(found / "masks.safetensors")).items()}
    return int(meta["step"]), masks
