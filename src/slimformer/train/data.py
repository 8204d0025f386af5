"""Training data: tokenized tensors and the deterministic, rank-sharded order of micro-batches.

The global order is a fresh permutation per epoch from a fixed seed. Step s uses the next
`batch_size * world * grad_accum` examples of that stream (the global batch); rank r takes its
own contiguous `batch_size * grad_accum` of them, cut into `grad_accum` micro-batches. With
equal-sized examples the mean over all micro-batches of all ranks is the global-batch mean, so N
processes take the same step as one process with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slimformer.data.sources import TextData
from slimformer.data.windows import lm_windows
from slimformer.errors import UserError


@dataclass(frozen=True)
class TrainData:
    """Equal-length tensors (first dimension = examples): `input_ids`, optionally `attention_mask`
    and `labels` (class indices); `classes` names the label values."""

    tensors: dict[str, Tensor]
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


def lm_data(tokenizer: Any, data: TextData, seq_len: int, max_windows: int | None = None) -> TrainData:
    """Non-overlapping `seq_len`-token windows of the joined texts (the calibration pool)."""
    return TrainData({"input_ids": lm_windows(tokenizer, data.joined(), seq_len, max_windows, purpose="training")})


def classification_data(tokenizer: Any, data: TextData, max_length: int = 64,
                        classes: tuple[str, ...] | None = None, require_labels: bool = True) -> TrainData:
    """Texts padded to `max_length` tokens with integer labels (classes sorted by name unless given);
    without labels (and `require_labels=False`) the texts alone."""
    if data.labels is None and not require_labels:
        enc = tokenizer(list(data.texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return TrainData({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if data.labels is None:
        raise UserError(f"data '{data.name}' has no labels; classification training needs a label per text "
                        "(a .jsonl 'label' field or a .csv 'label' column).")
    classes = classes or tuple(sorted(set(data.labels)))
    unknown = sorted(set(data.labels) - set(classes))
    if unknown:
        raise UserError(f"data '{data.name}': labels {unknown[:5]} are not among the classes {list(classes)}.")
    enc = tokenizer(list(data.texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[label] for label in data.labels], dtype=torch.long)
    return TrainData({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}, classes)


def global_indices(n: int, step: int, global_batch: int, seed: int) -> Tensor:
    """Example indices (global_batch,) of step `step` (0-based): positions in a stream of per-epoch
    permutations of range(n), each drawn from a generator seeded by (seed, epoch)."""
    positions = torch.arange(step * global_batch, (step + 1) * global_batch)
    epochs = positions // n
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():  # one or two epochs per step
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        hit = epochs == epoch
        out[hit] = perm[positions[hit] % n]
    return out


def micro_batches(data: TrainData, step: int, batch_size: int, grad_accum: int, rank: int, world: int,
                  seed: int) -> list[dict[str, Tensor]]:
    """This rank's `grad_accum` micro-batches of `batch_size` examples for step `step` (0-based),
    padding trimmed to the longest example of each micro-batch."""
    per_rank = batch_size * grad_accum
    idx = global_indices(len(data), step, per_rank * world, seed)[rank * per_rank:(rank + 1) * per_rank]
    batches = []
    for chunk in idx.split(batch_size):
        batch = {k: v[chunk] for k, v in data.tensors.items()}
        if "attention_mask" in batch:
            length = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}
        batches.append(batch)
    return batches
