"""Latency: median forward time over repeated runs after warm-up, threads stated."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


@torch.inference_mode()
def measure_latency(
    model: nn.Module, vocab_size: int, *, batch: int = 1, seq: int = 128, runs: int = 20, warmup: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median/min/max milliseconds of one forward pass on fixed random token ids (batch x seq)."""
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    try:
        ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False) if _takes_cache(model) else model(input_ids=ids, attention_mask=mask)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_ms": statistics.median(times), "latency_min_ms": min(times), "latency_max_ms": max(times),
        "latency_batch": batch, "latency_seq": seq, "latency_threads": threads, "latency_runs": runs,
    }


def _takes_cache(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "use_cache", None) is not None and hasattr(model, "generate")
