"""What a method may need besides the model and its config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from slimformer.data.windows import calibration_windows
from slimformer.errors import UserError


@dataclass
class StepContext:
    """Shared inputs for recipe steps: the tokenizer, model kind, and calibration data (lazily used)."""

    tokenizer: Any = None
    kind: str = "decoder"  # "decoder" | "encoder"
    calib: Any = None  # slimformer.data.sources.TextData or None
    progress: bool = True
    # --resume: where this step's layer-wise engine saves finished blocks, and whether to reuse them
    checkpoint: Path | None = None
    resume: bool = False
    fingerprint: str | None = None  # the run's: stored with every checkpoint, checked on restore
    # training steps: the frozen model as it was before the recipe (the distillation teacher)
    teacher: Any = None
    # where layer-wise blocks and whole-model steps compute (None: where the weights are)
    device: Any = None

    def calibration_windows(self, num_samples: int, seq_len: int, method: str) -> Tensor:
        """(num_samples, seq_len) token windows of the calibration text (BOS-first where the
        tokenizer prepends BOS); UserError naming `method` when there is no text or tokenizer."""
        if self.calib is None or self.tokenizer is None:
            raise UserError(f"{method} needs calibration data (--calib, or calib= in Python) and a tokenizer.")
        return calibration_windows(self.tokenizer, self.calib, num_samples, seq_len)


def track(ctx: StepContext | None, items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """`items` with a progress bar when the step runs with progress on (no context: none)."""
    return tqdm(items, desc=desc, total=total, disable=ctx is None or not ctx.progress, unit="layer", leave=False)
