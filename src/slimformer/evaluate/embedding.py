"""Sentence embeddings (masked mean pooling) and embedding fidelity (cosine)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from slimformer.errors import UserError
from slimformer.models.placement import input_device
from slimformer.evaluate.divergence import mean_pool



def embed(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = False,
) -> Tensor:
    """Mask-weighted mean of `last_hidden_state`: `(len(texts), hidden)` float32, in input order."""
    texts = list(texts)
    if not texts:
        raise UserError("embed: expected at least one text, found an empty list")
    if batch_size < 1:
        raise UserError(f"embed batch_size: expected >= 1, found {batch_size}")
    device = input_device(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    chunks: list[Tensor] = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch_size), desc="embed", disable=not progress, unit="batch"):
            batch = [texts[i] for i in order[s : s + batch_size]]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state.float()
            chunks.append(mean_pool(hidden, enc["attention_mask"]).cpu())
    sorted_emb = torch.cat(chunks)
    out = torch.empty_like(sorted_emb)
    out[torch.tensor(order)] = sorted_emb
    return out


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity of two `(N, H)` embedding matrices."""
    if a.shape != b.shape:
        raise UserError(f"mean_cosine: expected two embeddings of the same shape, found {tuple(a.shape)} and {tuple(b.shape)}")
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())
