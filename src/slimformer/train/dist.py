"""PyTorch's own distributed engine, used when launched by `torchrun` (WORLD_SIZE > 1).

Nothing here runs at import. `init_distributed()` starts the process group once (gloo on CPU,
nccl on CUDA); single-process runs need no launcher and no process group.
"""

from __future__ import annotations

import atexit
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


def device(preferred: torch.device | None = None) -> torch.device:
    """This rank's device: the CPU when `preferred` is the CPU, else its local CUDA device when CUDA
    is present (under torchrun, GPU LOCAL_RANK), else the CPU."""
    if preferred is not None and preferred.type == "cpu":
        return preferred
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
        # Gloo's worker threads still hold tensors at interpreter shutdown unless the group is
        # destroyed first; without this a rank can abort at exit ("terminate called without an
        # active exception", SIGABRT) after all its work is done (pytorch#190489).
        atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_dtensor(t: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: an FSDP parameter's (DTensor's) local shard, else `t`; in-place edits reach `t`."""
    return t.to_local() if _is_dtensor(t) else t


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the unsharded tensor `full` that lies on this rank's shard of `like`, on `like`'s device."""
    if not _is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds `full`, so each cuts its own part without communicating
    part = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return part.to_local()


def wrap(module: nn.Module, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """`module` wrapped for data-parallel training across the process group (unchanged alone).

    fsdp: FSDP2 (`fully_shard`) in place on a 1-D device mesh, on CUDA (nccl) and on CPU (gloo) alike:
    each Transformer block is one shard group, the remaining parameters the root's. Its parameters and
    gradients become DTensors sharded along dim 0; the returned module is `module` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    dev = device()
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from slimformer.models.layout import find_blocks

        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
        try:
            _, blocks = find_blocks(module)
        except UserError:  # no block list: the whole model is one shard group
            blocks = nn.ModuleList()
        for block in blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(module, mesh=mesh)
    # find_unused_parameters: e.g. BERT's pooler gets no gradient when states are mean-pooled
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None,
                                               find_unused_parameters=True)
