"""strategy: fsdp (FSDP2 on CPU processes, gloo) under torchrun: resume and pruning masks.

The plain 2-process FSDP run is compared with the 1-process run in test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _torchrun
from train_tiny import gradual_task, tiny_llama, tiny_windows

from slimformer.errors import UserError
from slimformer.train.loop import train
from slimformer.train.state_io import load_state
from slimformer.train.task import TrainConfig
from slimformer.train.tasks import SupervisedTask


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    """2 steps with a checkpoint, then resumed to 4: the same weights as 4 steps in one go (and as 1 process)."""
    _torchrun(tmp_path, "fsdp", "resume")
    full, resumed = (load_file(str(tmp_path / f"rank0.{run}.safetensors")) for run in ("full", "resumed"))
    assert _max_diff(resumed, load_file(str(tmp_path / "rank1.resumed.safetensors"))) == 0  # replicas identical
    checkpoint = next((tmp_path / "ckpt").glob("step_*"))
    assert checkpoint.name == "step_000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["masks.safetensors", "model.safetensors", "optimizer.json",
                                                            "optimizer.safetensors", "state.json"]
    optimizer = load_state(checkpoint, "optimizer")  # one full state, keyed by parameter name
    assert "model.lm_head.weight" in optimizer["state"]
    assert set(optimizer["param_groups"][0]["params"]) == set(optimizer["state"])  # names, as str keys
    assert optimizer["state"]["model.lm_head.weight"]["exp_avg"].shape == (64, 16)
    assert _max_diff(resumed, full) < 1e-5
    single, _ = train(tiny_llama(), SupervisedTask(), tiny_windows(),
                      TrainConfig(steps=4, lr=1e-2, batch_size=4, seq_len=12, schedule="constant"))
    assert _max_diff(full, single.state_dict()) < 1e-5
    with pytest.raises(UserError, match="strategy: fsdp"):  # its optimizer state is laid out by parameter name
        train(tiny_llama(), SupervisedTask(), tiny_windows(), TrainConfig(steps=4, seq_len=12),
              checkpoint=tmp_path / "ckpt", resume=True)


def test_fsdp_gradual_pruning_keeps_masks(tmp_path: Path) -> None:
    """Fixed masks (pruned before training) and masks recomputed by after_step stay zero under FSDP, with
    2 micro-batches per rank, and the weights equal the 1-process run's."""
    _torchrun(tmp_path, "fsdp", "gradual")
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert _max_diff(r0, r1) == 0
    model, task = gradual_task(tiny_llama(), steps=3)
    single, _ = train(model, task, tiny_windows(),
                      TrainConfig(steps=3, lr=1e-2, batch_size=4, seq_len=12, schedule="constant"))
    ref = single.state_dict()
    assert _max_diff(r0, ref) < 1e-5
    for name in task.layers:
        weight = r0[name + ".weight"]
        assert abs((weight == 0).float().mean().item() - 0.5) < 0.02, name  # 50% zeros per layer at the end
        assert torch.equal(weight == 0, ref[name + ".weight"] == 0), name  # the same weights pruned
