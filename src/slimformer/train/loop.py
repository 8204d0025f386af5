"""The one training loop every training step uses (the task API is `train/task.py`; see `slimformer.train`).

AdamW, linear warmup then cosine or constant LR, gradient accumulation, gradient clipping, a fixed
seed, fixed sparsity masks, DDP/FSDP under torchrun, and checkpoints that a resumed run continues
from with bit-identical results (the data order and the dropout seed are functions of the step, so
no random state needs saving).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimformer.errors import UserError
from slimformer.train import dist
from slimformer.train.checkpoints import latest, load_optimizer, load_weights, save_checkpoint
from slimformer.train.data import TrainData, micro_batches
from slimformer.train.schedule import lr_at
from slimformer.train.sharding import fsdp_split, full_model, gather_full
from slimformer.train.task import TrainConfig, TrainModule, TrainState, TrainTask, fixed_masks, reapply_masks


def train(model: nn.Module, task: TrainTask, data: TrainData, options: TrainConfig, *,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = False,
          device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` with `task` on `data` for `options.steps` steps; returns (model, info).
    `device`: where to train (None: this rank's GPU when there is one, else the CPU).

    Under torchrun, every rank calls this with the same arguments; rank 0 alone writes checkpoints
    (FSDP: gathered into full, unsharded weights and optimizer state first)."""
    distributed = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    dev = dist.device(device)
    if resume and checkpoint is None:
        raise UserError("resume needs a checkpoint folder (an --output folder for the recipe).")
    model = task.prepare(model)
    module = TrainModule(model, task).to(dev)
    masks = {k: v.to(dev) for k, v in fixed_masks(model).items()}
    start = 0
    fsdp = distributed and world > 1 and options.strategy == "fsdp"
    found = latest(checkpoint) if resume and checkpoint is not None else None
    if found is not None:
        start, masks = load_weights(found, module, dev, fsdp)
    template = None
    if fsdp:
        template, module = fsdp_split(module, dev)
    wrapped = dist.wrap(module, options.strategy)
    optimizer = _optimizer(wrapped, options, found, fsdp)
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
            loss = _step(wrapped, optimizer, data, step, options, rank, world, dev, masks)
            state.step, state.lr = step + 1, lr
            reapply_masks(module.model, state.masks)
            if type(task).after_step is not TrainTask.after_step:  # FSDP: a full-weight round trip, so only if needed
                with full_model(wrapped, module, template, fsdp) as full:
                    task.after_step(full.model, state)
                state.masks.update({k: v.to(dev) for k, v in state.masks.items()})
            masks = state.masks
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint is not None and options.checkpoint_every and (step + 1) % options.checkpoint_every == 0:
                save_checkpoint(checkpoint, step + 1, wrapped, module, template, optimizer, state.masks, fsdp, rank)
    wrapped.eval()
    if fsdp:
        gather_full(wrapped, template)
        module = template
    model = module.model.cpu().eval()
    model, info = task.finish(model)
    return model, {"steps": options.steps, "resumed_from": start, "world_size": world,
                   "global_batch": options.batch_size * world * options.grad_accum,
                   "loss_first": round(curve[0], 5) if curve else None, "loss_last": round(curve[-1], 5) if curve else None,
                   "train_wall_s": round(time.perf_counter() - t0, 2), **info}


def _optimizer(wrapped: nn.Module, options: TrainConfig, found: Path | None, fsdp: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, its state restored from checkpoint `found` if any."""
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise UserError("training found no trainable parameter (every parameter has requires_grad=False).")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if found is not None:
        load_optimizer(found, wrapped, optimizer, fsdp)
    return optimizer


def _step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData, step: int, options: TrainConfig,
          rank: int, world: int, dev: torch.device, masks: dict[str, Tensor]) -> float:
    """One optimizer step over this rank's micro-batches; returns the mean loss over all ranks."""
    batches = micro_batches(data, step, options.batch_size, options.grad_accum, rank, world, options.seed)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=dev)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        with contextlib.nullcontext() if sync else _no_grad_sync(wrapped):
            loss, _ = wrapped({k: v.to(dev) for k, v in batch.items()})
            if not torch.isfinite(loss):
                raise UserError(f"training loss became {loss.item()} at step {step + 1}; lower lr (now {options.lr}).")
            (loss / len(batches)).backward()
        total += loss.detach() / len(batches)
    _mask_grads(wrapped, masks)
    if options.max_grad_norm > 0:  # FSDP: DTensor gradients, whose norm clip_grad_norm_ reduces across ranks
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
        if grad is not None:  # FSDP: a sharded DTensor, masked shard by shard
            dist.local(grad).mul_(dist.local_part(mask, grad))


@contextlib.contextmanager
def _no_grad_sync(wrapped: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients without syncing them across ranks."""
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: no reduce-scatter until the last micro-batch
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def _inner(wrapped: nn.Module) -> TrainModule:
    return wrapped.module if not isinstance(wrapped, TrainModule) else wrapped
