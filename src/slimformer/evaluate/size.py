"""Size metrics: parameters, non-zeros, and bytes on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimformer.layers import compressed_layers

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".json")


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters (tied tensors counted once) and how many are non-zero; a compressed layer's codes
    count as that layer's weights (`slimformer.layers`)."""
    compressed = compressed_layers(model).values()
    seen: set[tuple] = set()
    total = nonzero = 0
    for t in list(model.parameters()) + [m.codes for m in compressed]:
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    # a QuantLinear code equal to its zero point is a zero weight: count from the dequantized weight
    for m in compressed:
        nonzero -= int(torch.count_nonzero(m.codes)) - int(torch.count_nonzero(m.dequantized_weight()))
    return {"params": total, "nonzero_params": nonzero}


def folder_bytes(folder: Path) -> int:
    """Bytes of the model files in a folder (weights, configs, manifest; not reports or plots)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
               and not p.name.startswith(("report", "tokenizer", "special_tokens", "vocab")))
