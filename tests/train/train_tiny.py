"""A tiny random Llama and random token windows for training tests (no real model needed)."""

from __future__ import annotations

import torch
import transformers
from tiny import tiny_llama  # tests/tiny.py; the training tests import it from here

from slimformer.train.data import TrainData

__all__ = ["gradual_task", "tiny_llama", "tiny_windows"]


def tiny_windows(n: int = 16, seq_len: int = 12, seed: int = 1) -> TrainData:
    gen = torch.Generator().manual_seed(seed)
    return TrainData({"input_ids": torch.randint(0, 64, (n, seq_len), generator=gen)})


def gradual_task(model: transformers.LlamaForCausalLM, steps: int):
    """(model, task): gradual magnitude pruning of the tiny Llama's MLP projections, 25% pruned before
    training (fixed masks from step 1) and 50% from step 2 on (masks recomputed by `after_step`)."""
    from slimformer.train.steps import GradualConfig, _Gradual
    from slimformer.train.tasks import SupervisedTask

    targets = [n for n, _ in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    config = GradualConfig(steps=steps, sparsity=0.5, initial_sparsity=0.25, update_every=1, ramp=0.5)
    task = _Gradual(SupervisedTask(), config, targets)
    task._prune(model, {}, config.initial_sparsity)
    return model, task
