"""Optimizer state as safetensors + JSON: an exact round trip of a real AdamW state, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.train.state_io import flatten, load_state, save_state, unflatten


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, first: int, last: int) -> None:
    for step in range(first, last):
        gen = torch.Generator().manual_seed(step)  # the data is a function of the step
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 3, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _trained_adamw(steps: int = 3) -> tuple[nn.Module, torch.optim.AdamW]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _steps(model, optimizer, 0, steps)
    return model, optimizer


def _assert_same(a: object, b: object) -> None:
    """Equal trees: the same container types, keys (with their types, in order), values and tensors."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_adamw_state_round_trips_exactly(tmp_path: Path) -> None:
    _, optimizer = _trained_adamw()
    state = optimizer.state_dict()
    assert set(state["state"]) == {0, 1, 2, 3} and state["state"][0]["step"].dtype == torch.float32
    save_state(state, tmp_path, "optimizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    back = load_state(tmp_path, "optimizer")
    _assert_same(state, back)  # int keys, AdamW's float32 step tensor, the betas tuple
    assert back["param_groups"] == state["param_groups"] and type(back["param_groups"][0]["betas"]) is tuple


def test_pure_pair_keys_tensors_by_path_and_keeps_str_keys() -> None:
    """FSDP's full state dict: keyed by parameter name (dots in the names), int64 and bf16 tensors too."""
    state = {"state": {"model.w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2, dtype=torch.bfloat16)},
                       "model.b": {"step": torch.tensor(3, dtype=torch.int64)}},
             "param_groups": [{"lr": 0.5, "betas": (0.9, 0.999), "foreach": None, "amsgrad": False,
                               "params": ["model.w", "model.b"]}]}
    tensors, skeleton = flatten(state)
    assert sorted(tensors) == ["state/model.b/step", "state/model.w/exp_avg", "state/model.w/step"]
    _assert_same(state, unflatten(tensors, json.loads(json.dumps(skeleton))))


def test_pure_pair_refuses_what_it_cannot_store_or_read() -> None:
    with pytest.raises(ValueError, match="not unique"):
        flatten({0: torch.zeros(1), "0": torch.zeros(1)})
    with pytest.raises(TypeError, match="int or str"):
        flatten({1.5: 0})
    with pytest.raises(TypeError, match="set"):
        flatten({"a": {1, 2}})
    tensors, skeleton = flatten({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks"):
        unflatten({}, skeleton)
    with pytest.raises(ValueError, match="does not name"):
        unflatten({**tensors, "b": torch.zeros(1)}, skeleton)
    with pytest.raises(ValueError, match="skeleton node"):
        unflatten(tensors, [1, 2])


def test_resume_from_round_tripped_state_is_bit_identical(tmp_path: Path) -> None:
    straight, optimizer = _trained_adamw(steps=6)
    interrupted, first = _trained_adamw(steps=3)
    save_state(first.state_dict(), tmp_path, "optimizer")
    weights = {k: v.clone() for k, v in interrupted.state_dict().items()}

    resumed = _model()
    resumed.load_state_dict(weights)
    second = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    second.load_state_dict(load_state(tmp_path, "optimizer"))
    _steps(resumed, second, 3, 6)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    _assert_same(optimizer.state_dict(), second.state_dict())


@pytest.mark.parametrize("damage", ["truncated tensors", "no tensors", "invalid json", "foreign json"])
def test_damaged_files_give_a_user_error(tmp_path: Path, damage: str) -> None:
    save_state(_trained_adamw()[1].state_dict(), tmp_path, "optimizer")
    tensors, skeleton = tmp_path / "optimizer.safetensors", tmp_path / "optimizer.json"
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:-10])
    elif damage == "no tensors":
        tensors.unlink()
    elif damage == "invalid json":
        skeleton.write_text(skeleton.read_text()[:-5])
    else:
        skeleton.write_text('{"state": {}}')
    with pytest.raises(UserError, match="damaged"):
        load_state(tmp_path, "optimizer")
