"""A real 2-process gloo run under torchrun equals the 1-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_tiny import tiny_llama, tiny_windows

from slimformer.train.loop import TrainOptions, train
from slimformer.train.tasks import SupervisedTask

HERE = Path(__file__).parent


def _torchrun(out: Path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(out), strategy]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp"])
def test_two_process_run_equals_one_process(tmp_path: Path, strategy: str) -> None:
    _torchrun(tmp_path, strategy)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # replicas identical
    # one process, batch 4 = 2 processes x batch 2
    single, info = train(tiny_llama(), SupervisedTask(), tiny_windows(),
                         TrainOptions(steps=3, lr=1e-2, batch_size=4, seq_len=12, schedule="constant"))
    ref = single.state_dict()
    start = tiny_llama().state_dict()
    assert max((r0[k] - start[k]).abs().max().item() for k in r0) > 1e-3  # it trained
    assert max((r0[k] - ref[k]).abs().max().item() for k in r0) < 1e-5
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        assert abs(float(f.metadata()["loss_last"]) - info["loss_last"]) < 1e-4
