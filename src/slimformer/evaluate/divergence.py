"""How far one model's outputs are from another's, and masked mean pooling: pure tensor functions
shared by scoring (structured heads, mixed precision), embedding fidelity and encoder training."""

from __future__ import annotations

import torch
from torch import Tensor


def output_divergence(ref: Tensor, out: Tensor, kind: str) -> float:
    """Decoders: KL(p_ref || p_out) per token, averaged (`ref`, `out`: log-probabilities over the
    vocabulary). Encoders: 1 - mean cosine of the hidden states along the last dimension."""
    if kind == "decoder":
        return float((ref.exp() * (ref - out)).sum(-1).mean())
    return float(1.0 - torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean())


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, H) -> (B, H): the mean over the tokens `mask` (B, T) keeps (all of them without a mask)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
