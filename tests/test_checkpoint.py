"""--resume: a layer-wise run stopped after some blocks and resumed equals an uninterrupted run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimformer.checkpoint import BlockCheckpoint, claim, fingerprint, holds_finished, open_checkpoints
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.quant.awq import AWQConfig, awq
from slimformer.quant.gptq import GPTQConfig, gptq
from slimformer.quant.qlinear import QuantLinear


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method, config", [
    pytest.param(gptq, GPTQConfig(bits=4, group_size=128, num_samples=2, targets=("mlp.down_proj",)),
                 marks=pytest.mark.slow, id="gptq"),
    pytest.param(awq, AWQConfig(bits=4, group_size=128, num_samples=2, grid=4, targets=("self_attn.o_proj",)),
                 id="awq"),
])
def test_resume_gives_identical_tensors(smollm_bundle, tmp_path, method, config) -> None:
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    reference = copy.deepcopy(smollm_bundle.model)
    ref_info = method(reference, config, ctx)

    folder = tmp_path / "step0"
    interrupted = copy.deepcopy(smollm_bundle.model)
    method(interrupted, config, StepContext(**{**ctx.__dict__, "checkpoint": folder}))
    assert BlockCheckpoint(folder).finished(30) == 30
    for index in range(11, 30):  # as if the run had stopped after block 10
        (folder / f"block_{index}.json").unlink()

    resumed = copy.deepcopy(smollm_bundle.model)
    info = method(resumed, config, StepContext(**{**ctx.__dict__, "checkpoint": folder, "resume": True}))
    assert info == ref_info
    assert sum(isinstance(m, QuantLinear) for m in resumed.modules()) == 30
    ref, got = _state(reference), _state(resumed)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_fingerprint_mismatch_is_refused(tmp_path) -> None:
    digest = fingerprint(model="a", recipe={"steps": []})
    root = open_checkpoints(tmp_path / "ck", digest, resume=False)
    assert not root.exists()  # created only when a step first saves something
    claim(root / "step0", digest)
    assert json.loads((root / "fingerprint.json").read_text())["fingerprint"] == digest
    with pytest.raises(UserError, match="another model, recipe"):
        open_checkpoints(root, fingerprint(model="b", recipe={"steps": []}), resume=True)
    open_checkpoints(root, fingerprint(model="b", recipe={}), resume=False)  # a fresh run discards it
    assert not root.exists()


def _saved_block(root, digest: str) -> BlockCheckpoint:
    checkpoint = BlockCheckpoint(root / "step0", digest)
    checkpoint.save(0, torch.nn.Sequential(torch.nn.Linear(4, 3)), {"layers": 1})
    return checkpoint


def test_block_from_another_run_is_refused(tmp_path) -> None:
    """Every block carries its run's fingerprint: a block written by another run is never mixed in."""
    root = tmp_path / "ck"
    _saved_block(root, "run-a")
    assert holds_finished(root)
    meta = root / "step0" / "block_0.json"
    meta.write_text(meta.read_text().replace("run-a", "run-b"))
    with pytest.raises(UserError, match="another run"):
        open_checkpoints(root, "run-a", resume=True)
    with pytest.raises(UserError, match="another run"):
        BlockCheckpoint(root / "step0", "run-a").restore([torch.nn.Sequential(torch.nn.Linear(4, 3))], 1)


@pytest.mark.parametrize("damage", ["truncate weights", "garble json"])
def test_damaged_block_is_refused_before_any_work(tmp_path, damage) -> None:
    root = tmp_path / "ck"
    _saved_block(root, "run-a")
    weights, meta = root / "step0" / "block_0.safetensors", root / "step0" / "block_0.json"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:-10])
    else:
        meta.write_text(meta.read_text()[:-5])
    with pytest.raises(UserError, match="damaged"):
        open_checkpoints(root, "run-a", resume=True)


def test_holds_finished(tmp_path) -> None:
    root = tmp_path / "ck"
    assert not holds_finished(root)
    claim(root / "step0", "d")
    assert not holds_finished(root)  # a claimed folder with nothing finished may go
    _saved_block(root, "d")
    assert holds_finished(root)
