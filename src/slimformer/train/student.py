"""Students built from the teacher by dropping whole Transformer blocks (a smaller copy, same width)."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimformer.errors import UserError
from slimformer.models.structure import keep_blocks


def student_layers(spec: dict[str, Any], n_layers: int) -> list[int]:
    """Blocks to keep from `{keep_layers: [i, ...]}` or `{every: k}` (blocks 0, k, 2k, ...)."""
    check_student(spec)
    key, value = next(iter(spec.items()))
    if key == "every":
        return list(range(0, n_layers, value))
    keep = sorted(set(value))
    if keep[-1] >= n_layers:
        raise UserError(f"student: keep_layers {list(value)} must lie in 0..{n_layers - 1} (the model has {n_layers} blocks).")
    return keep


def check_student(spec: Any) -> None:
    """UserError unless `spec` is `{keep_layers: [non-negative ints]}` or `{every: positive int}`."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("keep_layers", "every"):
        raise UserError(f"student: expected {{keep_layers: [0, 2, 4]}} or {{every: 2}}, found {spec!r}.")
    key, value = next(iter(spec.items()))
    if key == "every":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"student: every must be a positive integer, found {value!r}.")
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise UserError(f"student: keep_layers must be a non-empty list of block indices (0, 1, ...), found {value!r}.")


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only blocks `keep` (in place; `models.structure.keep_blocks`). Returns `model`."""
    keep_blocks(model, keep)
    return model
