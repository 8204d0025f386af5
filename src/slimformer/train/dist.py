"""PyTorch's own distributed engine, used when launched by `torchrun` (WORLD_SIZE > 1).

Nothing here runs at import. `init_distributed()` starts the process group once (gloo on CPU,
nccl on CUDA); single-process runs need no launcher and no process group.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from slimformer.errors import UserError


def world_size() -> int:
    """Number of processes: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and reports (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its local CUDA device when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> bool:
    """Start the process group if launched with WORLD_SIZE > 1 and not started yet; True if distributed."""
    if world_size() <= 1:
        return False
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; launch without torchrun.")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(module: nn.Module, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """`module` wrapped for data-parallel training across the process group (unchanged alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    dev = device()
    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        if dev.type != "cuda":
            raise UserError("strategy: fsdp shards the model across GPUs (nccl); PyTorch's FSDP does not run on "
                            "CPU processes. Use strategy: ddp on CPU.")

        return FullyShardedDataParallel(module, device_id=dev, use_orig_params=True)
    # find_unused_parameters: e.g. BERT's pooler gets no gradient when states are mean-pooled
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None,
                                               find_unused_parameters=True)
