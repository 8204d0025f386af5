"""Check a written GGUF file in llama.cpp itself: its logits against the PyTorch model's on real text."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def llama_cpp_available() -> bool:
    """True where the llama-cpp-python binding is installed (`make llamacpp`)."""
    return importlib.util.find_spec("llama_cpp") is not None


@torch.inference_mode()
def gguf_parity(model: nn.Module, path: Path, ids: Tensor, *, threads: int | None = None) -> dict[str, Any] | None:
    """Cosine, max/mean |error| and top-1 agreement of llama.cpp's logits for `path` against `model`'s
    on the windows `ids` (n, T), in float64; None where llama.cpp is not installed."""
    if not llama_cpp_available():
        return None
    from slimformer.evaluate.llamacpp import GgufModel

    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
    with GgufModel(path, threads=threads, n_ctx=ids.shape[1]) as runtime:
        got = torch.stack([runtime.logits(row) for row in ids]).double()
    err = (got - ref).abs()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    return {"runtime": "llama.cpp", "cosine": round(float(cosine), 6), "max_abs_err": float(err.max()),
            "mean_abs_err": float(err.mean()), "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean())}
