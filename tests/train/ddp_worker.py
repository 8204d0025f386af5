"""Run under torchrun by test_distributed.py and test_fsdp.py on the tiny Llama; each rank saves its weights.

`worker.py OUT STRATEGY [SCENARIO]`, SCENARIO one of
  plain:   3 steps (batch 2 per rank)                               -> rank{r}.safetensors
  resume:  4 steps uninterrupted; 2 steps with a checkpoint, then
           resumed to 4 from it                                     -> rank{r}.full / rank{r}.resumed
  gradual: 3 steps of gradual pruning (masks recomputed each step,
           the initial ones fixed), batch 1 x 2 micro-batches       -> rank{r}.safetensors
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # train_tiny, tests/tiny.py
from train_tiny import gradual_task, tiny_llama, tiny_windows  # noqa: E402

from slimformer.train import dist  # noqa: E402
from slimformer.train.loop import train  # noqa: E402
from slimformer.train.task import TrainConfig  # noqa: E402
from slimformer.train.tasks import SupervisedTask  # noqa: E402


def _save(model, path: Path, info: dict) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: str(info[k]) for k in ("loss_last", "resumed_from")})


if __name__ == "__main__":
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    scenario = sys.argv[3] if len(sys.argv) > 3 else "plain"
    options = TrainConfig(steps=3, lr=1e-2, batch_size=2, grad_accum=1, seq_len=12, strategy=strategy, schedule="constant")
    r = dist.rank()
    if scenario == "plain":
        given = tiny_llama()
        model, info = train(given, SupervisedTask(), tiny_windows(), options)
        # the caller's own model comes back trained, unwrapped and unsharded (FSDP2 trains a copy)
        assert model is given and type(model).__name__ == "LlamaForCausalLM"
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())
        _save(model, out / f"rank{r}.safetensors", info)
    elif scenario == "resume":
        four = replace(options, steps=4)
        model, info = train(tiny_llama(), SupervisedTask(), tiny_windows(), four)
        _save(model, out / f"rank{r}.full.safetensors", info)
        two = replace(options, steps=2, checkpoint_every=2)
        train(tiny_llama(), SupervisedTask(), tiny_windows(), two, checkpoint=out / "ckpt")
        model, info = train(tiny_llama(), SupervisedTask(), tiny_windows(), four, checkpoint=out / "ckpt", resume=True)
        _save(model, out / f"rank{r}.resumed.safetensors", info)
    elif scenario == "gradual":
        model, task = gradual_task(tiny_llama(), steps=3)
        model, info = train(model, task, tiny_windows(), replace(options, batch_size=1, grad_accum=2))
        _save(model, out / f"rank{r}.safetensors", info)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
