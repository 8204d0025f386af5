"""only_trainable: the scored tensors alone get gradients, and everything is restored afterwards."""

from __future__ import annotations

import torch
from torch import nn

from slimformer.models.grads import only_trainable


def test_only_the_named_parameters_train_and_flags_come_back() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # a flag of the caller's that must survive
    model.train()
    with only_trainable(model, [model[0].weight], eval_mode=True):
        assert not model.training
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.weight"]
        model(torch.randn(3, 4)).sum().backward()
        assert model[0].weight.grad is not None and model[2].weight.grad is None
    assert model.training and model[0].weight.grad is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "0.weight": True, "0.bias": True, "2.weight": True, "2.bias": False}
    with only_trainable(model):
        assert model.training and not any(p.requires_grad for p in model.parameters())
