"""Distillation task set-up: projections for narrower students, refusal of wider ones."""

from __future__ import annotations

import pytest
import transformers

from slimformer.errors import UserError
from slimformer.train.loop import train
from slimformer.train.task import TrainConfig
from slimformer.train.tasks import DistillTask
from train_tiny import tiny_llama, tiny_windows


def _llama(hidden: int) -> transformers.LlamaForCausalLM:
    return tiny_llama(1, hidden_size=hidden)


def test_wider_student_is_refused() -> None:
    with pytest.raises(UserError, match="wider than its teacher"):
        DistillTask(tiny_llama(), hidden_weight=1.0).prepare(_llama(32))


def test_narrower_student_learns_through_a_projection() -> None:
    task = DistillTask(_llama(32), alpha=1.0, hidden_weight=1.0)
    student, info = train(tiny_llama(), task, tiny_windows(), TrainConfig(steps=8, lr=1e-2, batch_size=4, seq_len=12))
    assert task.extras["proj"].weight.shape == (32, 16)
    assert info["loss_last"] < info["loss_first"]
    assert info["layer_map"] == [0, 1]
