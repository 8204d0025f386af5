"""FSDP2 plumbing for the training loop: the sharded copy and its unsharded CPU template, full
weights for a task's `after_step`, and gathering the shards back (collectives: every rank calls them)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from slimformer.train.task import TrainModule


def fsdp_split(module: TrainModule, dev: torch.device) -> tuple[TrainModule, TrainModule]:
    """(template, to_shard). FSDP2 turns the module it shards into DTensors in place, so it shards a copy
    of the model (on `dev`) with the task's own extras (what the task's `loss` uses); the template keeps
    the caller's model, on the CPU, with a copy of the extras, and receives the trained weights."""
    template = module.cpu()
    extras = copy.deepcopy(template.extras)
    to_shard = TrainModule(copy.deepcopy(template.model), template._task[0]).to(dev)
    template.extras = extras
    return template, to_shard


@contextlib.contextmanager
def full_model(wrapped: nn.Module, module: TrainModule, template: TrainModule | None,
                fsdp: bool) -> Iterator[TrainModule]:
    """The TrainModule with full weights, for `after_step`. FSDP: the unsharded CPU copy `template`,
    filled from the shards and written back to them afterwards (collective: every rank enters)."""
    if not fsdp:
        yield module
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    gather_full(wrapped, template)
    yield template
    set_model_state_dict(wrapped, template.state_dict(), options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def gather_full(wrapped: nn.Module, template: TrainModule) -> None:
    """Copy the FSDP-sharded weights of `wrapped` into its unsharded CPU copy `template`, one tensor at a
    time (so only one full tensor is on the device at once). Collective: every rank calls it."""
    full = template.state_dict()
    for name, value in wrapped.state_dict().items():  # FSDP2 keeps the names; values are DTensors
        full[name].copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)
