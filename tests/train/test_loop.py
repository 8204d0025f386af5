"""The training loop on a tiny random Llama: learning, exact resume, fixed masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimformer.errors import UserError
from slimformer.train.loop import train
from slimformer.train.task import TrainConfig, TrainState
from slimformer.train.tasks import SupervisedTask
from train_tiny import tiny_llama, tiny_windows

OPTS = dict(lr=1e-2, batch_size=2, grad_accum=2, seq_len=12, warmup_steps=1)


class _Interrupted(SupervisedTask):
    """Stops the run in step 5, after the checkpoint of step 4 was written."""

    def after_step(self, model: torch.nn.Module, state: TrainState) -> None:
        if state.step == 5:
            raise KeyboardInterrupt


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_falls() -> None:
    _, info = train(tiny_llama(), SupervisedTask(), tiny_windows(n=4), TrainConfig(steps=12, **OPTS))
    assert info["loss_last"] < info["loss_first"] - 0.3
    assert info["global_batch"] == 4


def test_resume_reproduces_uninterrupted_weights(tmp_path: Path) -> None:
    full, _ = train(tiny_llama(), SupervisedTask(), tiny_windows(), TrainConfig(steps=6, **OPTS))
    ckpt = tmp_path / "ckpt"
    # "interrupted": a run that stops after 4 of 6 steps, with checkpoints every 2 steps
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), _Interrupted(), tiny_windows(), TrainConfig(steps=6, checkpoint_every=2, **OPTS),
              checkpoint=ckpt, resume=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000004"]
    resumed, info = train(tiny_llama(seed=5), SupervisedTask(), tiny_windows(),
                          TrainConfig(steps=6, checkpoint_every=2, **OPTS), checkpoint=ckpt, resume=True)
    assert info["resumed_from"] == 4
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pruned_zeros_stay_zero() -> None:
    model = tiny_llama()
    from slimformer.prune.magnitude import MagnitudeConfig, magnitude

    magnitude(model, MagnitudeConfig(sparsity=0.5))
    zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters() if "proj" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, _ = train(model, SupervisedTask(), tiny_windows(), TrainConfig(steps=3, weight_decay=0.1, **OPTS))
    after = dict(model.named_parameters())
    assert {n: int((after[n] == 0).sum()) for n in zeros} == zeros
    assert all(torch.equal(after[n] == 0, before[n] == 0) for n in zeros)
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_bad_options() -> None:
    with pytest.raises(UserError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(UserError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(UserError, match="resume"):
        train(tiny_llama(), SupervisedTask(), tiny_windows(), TrainConfig(steps=1), resume=True)


@pytest.mark.parametrize("damage", ["older format", "truncated tensors", "invalid json"])
def test_old_or_damaged_optimizer_files_give_a_user_error(tmp_path: Path, damage: str) -> None:
    """An optimizer.pt (the old pickle) is refused without being read; a damaged state is a UserError."""
    options = TrainConfig(steps=3, checkpoint_every=2, **OPTS)
    train(tiny_llama(), SupervisedTask(), tiny_windows(), options, checkpoint=tmp_path)  # keeps step_000002
    found = tmp_path / "step_000002"
    tensors, skeleton = found / "optimizer.safetensors", found / "optimizer.json"
    if damage == "older format":
        tensors.unlink()
        skeleton.unlink()
        (found / "optimizer.pt").write_bytes(b"\x80\x04not a pickle anyone should open")
        expected = "written by an older slimformer.*delete it or run without --resume"
    elif damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
        expected = "damaged"
    else:
        skeleton.write_text('{"format": 1, "skel')
        expected = "damaged"
    with pytest.raises(UserError, match=expected):
        train(tiny_llama(), SupervisedTask(), tiny_windows(), options, checkpoint=tmp_path, resume=True)
