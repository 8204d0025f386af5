"""What a method may need besides the model and its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepContext:
    """Shared inputs for recipe steps: the tokenizer, model kind, and calibration data (lazily used)."""

    tokenizer: Any = None
    kind: str = "decoder"  # "decoder" | "encoder"
    calib: Any = None  # slimformer.data.sources.TextData or None
    progress: bool = True
