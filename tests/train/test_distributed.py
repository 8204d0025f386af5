"""A real 2-process gloo run under torchrun (DDP, and FSDP2 on CPU) equals the 1-process run with the same global batch."""

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

from slimformer.train.loop import train
from slimformer.train.task import TrainConfig
from slimformer.train.tasks import SupervisedTask

HERE = Path(__file__).parent


def _torchrun(out: Path, strategy: str, scenario: str = "plain") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(out), strategy, scenario]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_equals_one_process(tmp_path: Path, strategy: str) -> None:
    _torchrun(tmp_path, strategy)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # replicas identical
    # one process, batch 4 = 2 processes x batch 2
    single, info = train(tiny_llama(), SupervisedTask(), tiny_windows(),
                         TrainConfig(steps=3, lr=1e-2, batch_size=4, seq_len=12, schedule="constant"))
    ref = single.state_dict()
    start = tiny_llama().state_dict()
    assert max((r0[k] - start[k]).abs().max().item() for k in r0) > 1e-3  # it trained
    assert max((r0[k] - ref[k]).abs().max().item() for k in r0) < 1e-5
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        assert abs(float(f.metadata()["loss_last"]) - info["loss_last"]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cli_under_torchrun_writes_one_output(tmp_path: Path, strategy: str) -> None:
    """`torchrun -m slimformer compress`: both ranks train, rank 0 alone measures and writes."""
    import json

    import transformers

    from slimformer.models.zoo import resolve_alias

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(resolve_alias("smollm2-135m"), local_files_only=True)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "r.yaml").write_text("steps:\n  - method: finetune\n    steps: 2\n    batch_size: 2\n    seq_len: 32\n"
                                     f"    strategy: {strategy}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slimformer",
           "compress", str(tmp_path / "tiny"), "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "out"),
           "--max-windows", "1", "--no-latency", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"][0]["world_size"] == 2 and report["steps"][0]["global_batch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml", "tiny"]  # no temporary leftovers
    assert done.stdout.count("wrote ") == 1
