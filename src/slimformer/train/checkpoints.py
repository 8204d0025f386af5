"""Training checkpoints: <folder>/step_<n>/{model, masks, optimizer}.safetensors + {optimizer, state}.json,
nothing pickled (FSDP: full weights, and one full optimizer state keyed by parameter name, so any
number of ranks can resume). Only rank 0 writes; a step's folder is renamed into place when complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from slimformer.errors import UserError
from slimformer.train import dist
from slimformer.train.sharding import gather_full
from slimformer.train.state_io import load_state, save_state
from slimformer.train.task import TrainModule


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (None: none yet)."""
    done = sorted(p for p in Path(folder).glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(folder: Path, step: int, wrapped: nn.Module, module: TrainModule, template: TrainModule | None,
          optimizer: torch.optim.Optimizer, masks: dict[str, Tensor], fsdp: bool, rank: int) -> None:
    """Write step `step` (weights, masks, optimizer state) and drop the older ones. Collective."""
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    target = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp"
    if fsdp:  # collectives: every rank takes part; the optimizer state becomes one full dict keyed by name
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        gather_full(wrapped, template)
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


def load_weights(found: Path, module: TrainModule, dev: torch.device, fsdp: bool) -> tuple[int, dict[str, Tensor]]:
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


def load_optimizer(found: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> None:
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
