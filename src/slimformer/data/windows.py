"""Cut text into fixed-length token windows for perplexity and calibration."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimformer.data.sources import TextData
from slimformer.errors import UserError


def prepends_bos(tokenizer: Any) -> bool:
    """True iff the tokenizer's default encoding starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = _input_ids(tokenizer("a"))
    return len(ids) > 0 and int(ids[0]) == int(bos)


def _input_ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"] if isinstance(encoding, dict) else encoding.input_ids
    return [int(i) for i in ids]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, without the max-length warning."""
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # simple tokenizers without a `verbose` keyword
        enc = tokenizer(text, add_special_tokens=False)
    return _input_ids(enc)


def lm_windows(tokenizer: Any, text: str, seq_len: int = 512, max_windows: int | None = None, *,
               purpose: str = "evaluation") -> Tensor:
    """Non-overlapping `(n, seq_len)` long windows of `text`; BOS-first if the tokenizer prepends BOS.

    The text is tokenized once; the short tail is dropped. With BOS, each window holds
    BOS plus `seq_len - 1` text tokens. `purpose` names the windows in errors ("evaluation",
    "calibration", "training").
    """
    bos = prepends_bos(tokenizer)
    if seq_len < (2 if bos else 1):
        raise UserError(f"seq_len: expected at least {2 if bos else 1}, found {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows: expected a positive number or None, found {max_windows}")
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    step = seq_len - 1 if bos else seq_len
    n = ids.numel() // step
    if n == 0:
        raise UserError(
            f"{purpose} text too short for one window: found {ids.numel()} tokens, "
            f"need at least {step} (seq_len={seq_len}{', one position reserved for BOS' if bos else ''})"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * step].view(n, step)
    if bos:
        col = torch.full((n, 1), int(tokenizer.bos_token_id), dtype=torch.long)
        windows = torch.cat([col, windows], dim=1)
    return windows.contiguous()


def calibration_windows(tokenizer: Any, data: TextData, n: int = 64, seq_len: int = 512) -> Tensor:
    """The first `n` windows (fewer if the text is shorter) of the joined calibration texts."""
    if n < 1:
        raise UserError(f"calibration windows: expected n >= 1, found {n}")
    return lm_windows(tokenizer, data.joined(), seq_len=seq_len, max_windows=n, purpose="calibration")
