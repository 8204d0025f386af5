"""Latency: median forward time over repeated runs after warm-up, threads stated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimformer.models.placement import input_device


def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `fn` after `warmup` untimed ones: the one timer every
    latency figure (torch, onnxruntime, llama.cpp) comes from."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)  # GPU work is asynchronous
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to `threads` (None: left as it is) inside the block, and
    restored after; yields the count in force."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield threads or previous
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def measure_latency(
    model: nn.Module, vocab_size: int, *, batch: int = 1, seq: int = 128, runs: int = 20, warmup: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median/min/max milliseconds of one forward pass on fixed random token ids (batch x seq)."""
    with torch_threads(threads) as threads:
        ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        ids = ids.to(input_device(model))
        mask = torch.ones_like(ids)
        extra = {"use_cache": False} if _takes_cache(model) else {}
        times = time_calls(lambda: model(input_ids=ids, attention_mask=mask, **extra), runs, warmup)
    return {
        "latency_ms": statistics.median(times), "latency_min_ms": min(times), "latency_max_ms": max(times),
        "latency_batch": batch, "latency_seq": seq, "latency_threads": threads, "latency_runs": runs,
    }



def _takes_cache(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "use_cache", None) is not None and hasattr(model, "generate")


@torch.inference_mode()
def measure_decode(model: nn.Module, vocab_size: int, *, context: int = 512, runs: int = 16, warmup: int = 3,
                   threads: int | None = None) -> dict[str, Any]:
    """Median/min/max milliseconds of decoding one token after a `context`-token prompt, with a
    key/value cache: a torch causal LM (DynamicCache) or an ONNX session exported with `kv_cache`.
    Empty for a model without a cache (an ONNX file exported without one)."""
    if hasattr(model, "step") and not getattr(model, "has_kv_cache", False):
        return {}
    with torch_threads(threads):
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab_size, (1, context), generator=gen).to(input_device(model))
        tokens = iter(torch.randint(0, vocab_size, (1, warmup + runs), generator=gen).to(input_device(model)).split(1, dim=1))
        step = _ort_stepper(model, prompt) if hasattr(model, "step") else _torch_stepper(model, prompt)
        times = time_calls(lambda: step(next(tokens)), runs, warmup)
    return {"decode_ms": statistics.median(times), "decode_min_ms": min(times), "decode_max_ms": max(times),
            "decode_context": context, "decode_runs": runs}


def _torch_stepper(model: nn.Module, prompt: torch.Tensor):
    state = {"cache": model(input_ids=prompt, use_cache=True).past_key_values}

    def step(token: torch.Tensor) -> None:
        state["cache"] = model(input_ids=token, past_key_values=state["cache"], use_cache=True).past_key_values

    return step


def _ort_stepper(model: Any, prompt: torch.Tensor):
    _, past = model.step(prompt, torch.ones_like(prompt), model.empty_past(1))
    state = {"past": past, "length": prompt.shape[1]}

    def step(token: torch.Tensor) -> None:
        state["length"] += 1
        _, state["past"] = model.step(token, torch.ones(1, state["length"], dtype=torch.long), state["past"])

    return step
