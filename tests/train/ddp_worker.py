"""Run under torchrun by test_distributed.py: 3 DDP steps on the tiny Llama; each rank saves its weights."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import tiny_llama, tiny_windows  # noqa: E402

from slimformer.train import dist  # noqa: E402
from slimformer.train.loop import TrainOptions, train  # noqa: E402
from slimformer.train.tasks import SupervisedTask  # noqa: E402

if __name__ == "__main__":
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    options = TrainOptions(steps=3, lr=1e-2, batch_size=2, grad_accum=1, seq_len=12, strategy=strategy, schedule="constant")
    model, info = train(tiny_llama(), SupervisedTask(), tiny_windows(), options)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{dist.rank()}.safetensors"), metadata={"loss_last": str(info["loss_last"])})
