"""Perplexity of a causal language model on fixed-length token windows."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from slimformer.errors import UserError
from slimformer.models.placement import input_device



def perplexity(model: Any, windows: Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """exp(mean NLL) of every next token in `windows` `(n, T)`; position 0 is context only.

    Returns ``{"ppl", "nll_sum", "tokens", "windows"}`` with ``tokens = n * (T - 1)``.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UserError(f"perplexity windows: expected a (n >= 1, seq_len >= 2) tensor, found shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise UserError(f"perplexity batch_size: expected >= 1, found {batch_size}")
    device = input_device(model)
    windows = windows.long()
    n, seq_len = windows.shape
    nll = torch.zeros((), dtype=torch.float64)
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        for s in tqdm(starts, desc="perplexity", disable=not progress, unit="batch"):
            batch = windows[s : s + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            pred = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            target = batch[:, 1:].reshape(-1)
            nll += F.cross_entropy(pred, target, reduction="sum").double().cpu()
    tokens = n * (seq_len - 1)
    nll_sum = float(nll)
    return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, "windows": n}
