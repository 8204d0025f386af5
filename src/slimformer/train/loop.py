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
from collections.abc import Iterator
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
from slimformer.train.state_io import load_state, save_state


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
    """Zero the masked-out weights (in place; an FSDP-sharded weight shard by shard)."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        dist.local(weight).mul_(dist.local_part(mask, weight))


def train(model: nn.Module, task: TrainTask, data: TrainData, options: TrainOptions, *,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` with `task` on `data` for `options.steps` steps; returns (model, info).

    Under torchrun, every rank calls this with the same arguments; rank 0 alone writes checkpoints
    (FSDP: gathered into full, unsharded weights and optimizer state first)."""
    distributed = dist.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    dev = dist.device()
    if resume and checkpoint is None:
        raise UserError("resume needs a checkpoint folder (an --output folder for the recipe).")
    model = task.prepare(model)
    module = TrainModule(model, task).to(dev)
    masks = {k: v.to(dev) for k, v in fixed_masks(model).items()}
    start = 0
    fsdp = distributed and world > 1 and options.strategy == "fsdp"
    found = _latest(checkpoint) if resume and checkpoint is not None else None
    if found is not None:
        start, masks = _load_weights(found, module, dev, fsdp)
    template = None
    if fsdp:
        template, module = _fsdp_split(module, dev)
    wrapped = dist.wrap(module, options.strategy)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise UserError("training found no trainable parameter (every parameter has requires_grad=False).")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if found is not None:
        _load_optimizer(found, wrapped, optimizer, fsdp)
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
            apply_masks(module.model, state.masks)
            if type(task).after_step is not TrainTask.after_step:  # FSDP: a full-weight round trip, so only if needed
                with _full_model(wrapped, module, template, fsdp) as full:
                    task.after_step(full.model, state)
                state.masks.update({k: v.to(dev) for k, v in state.masks.items()})
            masks = state.masks
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint is not None and options.checkpoint_every and (step + 1) % options.checkpoint_every == 0:
                _save(checkpoint, step + 1, wrapped, module, template, optimizer, state.masks, fsdp, rank)
    wrapped.eval()
    if fsdp:
        _gather(wrapped, template)
        module = template
    model = module.model.cpu().eval()
    model, info = task.finish(model)
    return model, {"steps": options.steps, "resumed_from": start, "world_size": world,
                   "global_batch": options.batch_size * world * options.grad_accum,
                   "loss_first": round(curve[0], 5) if curve else None, "loss_last": round(curve[-1], 5) if curve else None,
                   "train_wall_s": round(time.perf_counter() - t0, 2), **info}


def _step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData, step: int, options: TrainOptions,
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


def _fsdp_split(module: TrainModule, dev: torch.device) -> tuple[TrainModule, TrainModule]:
    """(template, to_shard). FSDP2 turns the module it shards into DTensors in place, so it shards a copy
    of the model (on `dev`) with the task's own extras (what the task's `loss` uses); the template keeps
    the caller's model, on the CPU, with a copy of the extras, and receives the trained weights."""
    template = module.cpu()
    extras = copy.deepcopy(template.extras)
    to_shard = TrainModule(copy.deepcopy(template.model), template._task[0]).to(dev)
    template.extras = extras
    return template, to_shard


@contextlib.contextmanager
def _full_model(wrapped: nn.Module, module: TrainModule, template: TrainModule | None,
                fsdp: bool) -> Iterator[TrainModule]:
    """The TrainModule with full weights, for `after_step`. FSDP: the unsharded CPU copy `template`,
    filled from the shards and written back to them afterwards (collective: every rank enters)."""
    if not fsdp:
        yield module
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _gather(wrapped, template)
    yield template
    set_model_state_dict(wrapped, template.state_dict(), options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def _gather(wrapped: nn.Module, template: TrainModule) -> None:
    """Copy the FSDP-sharded weights of `wrapped` into its unsharded CPU copy `template`, one tensor at a
    time (so only one full tensor is on the device at once). Collective: every rank calls it."""
    full = template.state_dict()
    for name, value in wrapped.state_dict().items():  # FSDP2 keeps the names; values are DTensors
        full[name].copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)


# ---- checkpoints: <folder>/step_<n>/{model, masks, optimizer}.safetensors + {optimizer, state}.json, nothing
# pickled (FSDP: full weights, and one full optimizer state keyed by parameter name, so any number of ranks can resume)

def _latest(folder: Path) -> Path | None:
    done = sorted(p for p in Path(folder).glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def _save(folder: Path, step: int, wrapped: nn.Module, module: TrainModule, template: TrainModule | None,
          optimizer: torch.optim.Optimizer, masks: dict[str, Tensor], fsdp: bool, rank: int) -> None:
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    target = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp"
    if fsdp:  # collectives: every rank takes part; the optimizer state becomes one full dict keyed by name
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        _gather(wrapped, template)
        optim_state = get_optimizer_state_dict(wrapped, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim_state = optimizer.state_dict()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(template if fsdp else module, str(tmp / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        save_state(optim_state, tmp, "optimizer")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": dist.world_size(), "fsdp": fsdp}))
    dist.barrier()
    if rank == 0:
        os.replace(tmp, target)
        for old in folder.glob("step_*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_weights(found: Path, module: TrainModule, dev: torch.device, fsdp: bool) -> tuple[int, dict[str, Tensor]]:
    """Restore weights from checkpoint `found` (before any wrapping); returns (steps done, masks)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    try:
        meta = json.loads((found / "state.json").read_text())
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"checkpoint '{found}': state.json is damaged ({str(exc)[:100]}); delete it or run without "
                        "--resume.") from None
    if not all((found / name).exists() for name in ("optimizer.safetensors", "optimizer.json")):
        if any(found.glob("optimizer*.pt")):  # a pickle (one per rank for older FSDP runs): never unpickled
            raise UserError(f"checkpoint '{found}' was written by an older slimformer (optimizer state in a pickle, "
                            "optimizer.pt, which this version does not read); delete it or run without --resume.")
        raise UserError(f"checkpoint '{found}' lacks optimizer.safetensors or optimizer.json (an incomplete "
                        "checkpoint); delete it or run without --resume.")
    if bool(meta.get("fsdp")) != fsdp:  # the two optimizer-state layouts differ (by parameter name vs by index)
        how = ("with strategy: fsdp under torchrun", "with strategy: ddp or in one process")[not meta.get("fsdp")]
        raise UserError(f"checkpoint '{found}' was written {how}; resume it the same way, or delete it.")
    try:
        load_model(module, str(found / "model.safetensors"), strict=True, device=str(dev))
        masks = {k: v.to(dev) for k, v in load_file(str(found / "masks.safetensors")).items()}
    except RuntimeError as exc:
        raise UserError(f"checkpoint '{found}' does not fit this model ({str(exc)[:200]}); delete it or run without --resume.") from None
    except (OSError, SafetensorError) as exc:
        raise UserError(f"checkpoint '{found}': model.safetensors or masks.safetensors cannot be read "
                        f"({str(exc)[:200]}); delete it or run without --resume.") from None
    return step, masks


def _load_optimizer(found: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> None:
    """Restore the optimizer state from checkpoint `found` (FSDP: the full dict, cut into this rank's shards).

    The state is read onto the CPU; `load_state_dict` moves each tensor to its parameter's device, and
    leaves AdamW's `step` on the CPU, where a fresh (not capturable, not fused) AdamW keeps it."""
    state = load_state(found, "optimizer")
    try:
        if not fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint '{found}': its optimizer state does not fit this optimizer ({str(exc)[:200]}); "
                        "delete it or run without --resume.") from None
