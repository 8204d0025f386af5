"""A decoder with random weights built from a real config and written to disk as safetensors shards,
one tensor at a time: the scale benchmark and tests measure memory and time on the shapes of models
too large to download here (SmolLM2-1.7B, Llama-3-8B) without ever holding the whole model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 2 * 2**30


def write_random_decoder(config: dict[str, Any], folder: Path, *, dtype: torch.dtype = torch.bfloat16,
                         tokenizer_from: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Write a Hugging Face folder for `config` (a config.json dict with `architectures`) with
    normal(0, initializer_range) weights, norms at 1, in `dtype`; copies the tokenizer files of
    `tokenizer_from`. The model is built on the meta device, so only one shard is ever in memory.
    Returns {params, bytes, shards}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    cfg.architectures = config.get("architectures")
    cfg.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    std = float(getattr(cfg, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, params, seen = 0, 0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied lm_head is the embedding's own tensor
            continue
        seen.add(id(p))
        t = _random_like(p, name, std, dtype, gen)
        if size + t.numel() * t.element_size() > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
        params += t.numel()
        if len(shards) > 1 and shards[-2]:  # a full shard is written and dropped before the next grows
            _write_shard(folder, len(shards) - 2, shards[-2])
            shards[-2] = {}
    total = _finish(folder, shards, cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if tokenizer_from is not None and (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return {"params": params, "bytes": total, "shards": len(shards)}


def _random_like(p: torch.Tensor, name: str, std: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if p.ndim == 1:  # norms at 1 (Gemma's stored offset at 0), biases at 0
        fill = 1.0 if "norm" in name else 0.0
        return torch.full(p.shape, fill, dtype=dtype)
    return (torch.randn(p.shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})


def _finish(folder: Path, shards: list[dict[str, torch.Tensor]], cfg: Any) -> int:
    """Write the last shard, rename the shards to the Hugging Face pattern, and write the index."""
    _write_shard(folder, len(shards) - 1, shards[-1])
    n = len(shards)
    weight_map, total = {}, 0
    for i in range(n):
        src = folder / f"shard-{i:05d}.safetensors"
        dst = folder / (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
        src.rename(dst)
        total += dst.stat().st_size
        with safe_open(str(dst), framework="pt") as f:
            weight_map.update({k: dst.name for k in f.keys()})
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    return total
