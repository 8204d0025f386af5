"""optimum-quanto's qint4 (benchmarks/peers.py): its own groups, evaluated outside inference mode."""

from __future__ import annotations

from typing import Any

import torch
from harness import Bench, PeerError  # benchmarks/harness.py
from torch import nn


def quanto_groups_note() -> str:
    return ("optimum-quanto qint4 has no group-size option: it starts at 128 and steps down by 32 until "
            "the row length divides (SmolLM2: 96 for 576-wide rows, 128 for 1536-wide); see the "
            "rtn-quanto row")


def quanto_cannot(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    raise PeerError(quanto_groups_note())


def quanto_qint4(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """optimum-quanto qint4 weights (affine min/max, float shift), frozen."""
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=bench.targets)
    freeze(model)
    groups = sorted({(model.get_submodule(n).in_features, model.get_submodule(n).weight_group_size)
                     for n in bench.targets})
    return OutsideInferenceMode(model), [
        "groups used (row length: group): " + ", ".join(f"{k}: {g}" for k, g in groups),
        "evaluated under no_grad: its int4 weights fail under torch.inference_mode "
        "(RuntimeError: Cannot set version_counter for inference tensor)"]


class OutsideInferenceMode(nn.Module):
    """Runs the model under no_grad instead of the caller's inference_mode (same arithmetic)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return self.model(input_ids=input_ids.clone(), **kwargs)  # clone: a normal tensor, not an inference one
