"""llm-compressor (vLLM's compressor) driven on CPU with our windows: GPTQ, AWQ, RTN, SmoothQuant,
W8A8 dynamic (benchmarks/peers.py), and its pruners through `oneshot` (benchmarks/pruning.py)."""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch
from harness import SEQ_LEN, Bench, PeerFn  # benchmarks/harness.py
from torch import nn


def _ct_weights(bits: int, group: int | None, symmetric: bool) -> dict[str, Any]:
    """compressed-tensors weight args: integer, per group (or per output channel with group None)."""
    args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    args.update({"strategy": "group", "group_size": group} if group else {"strategy": "channel"})
    return args


def _ct_scheme(weights: dict[str, Any], acts: dict[str, Any] | None = None) -> dict[str, Any]:
    """config_groups for every Linear (the LM head is ignored separately)."""
    group: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if acts is not None:
        group["input_activations"] = acts
    return {"group_0": group}


def _calib_dataset(bench: Bench) -> Any:
    """The calibration windows as a pre-tokenized `datasets.Dataset` (llm-compressor uses it as is)."""
    if "dataset" not in bench.cache:
        import datasets

        ids = bench.calib_windows
        bench.cache["dataset"] = datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
        )
    return bench.cache["dataset"]


def _oneshot(model: nn.Module, bench: Bench, recipe: list, calibrate: bool) -> None:
    """llm-compressor's oneshot on CPU, windows in order (no shuffling), one per batch."""
    from llmcompressor import oneshot
    from loguru import logger

    # compressed-tensors warns once per layer (e.g. 180 times for g128 on 576-wide rows)
    logger.disable("compressed_tensors")
    data = {}
    if calibrate:
        n = bench.calib_windows.shape[0]
        data = {"dataset": _calib_dataset(bench), "num_calibration_samples": n, "max_seq_length": SEQ_LEN,
                "shuffle_calibration_samples": False, "batch_size": 1}
    oneshot(model=model, recipe=recipe, **data)


def _quant_modifier(scheme: dict | str, **kw: Any) -> Any:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if isinstance(scheme, str):
        return QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=["lm_head"], **kw)
    return QuantizationModifier(config_groups=scheme, ignore=["lm_head"], **kw)


def llmc_gptq(group: int, bypass: bool = False, bits: int = 4) -> PeerFn:
    """GPTQModifier, asymmetric, our GPTQ's defaults (damp 0.01, block 128, act-order "static":
    columns by decreasing Hessian diagonal, group scales from the original weights, as ours; the
    docs' "act-order off" peer rows ran with actorder=None)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from llmcompressor.modifiers.gptq import GPTQModifier

        mod = GPTQModifier(config_groups=_ct_scheme(_ct_weights(bits, group, False)), ignore=["lm_head"],
                           dampening_frac=0.01, block_size=128, actorder="static", bypass_divisibility_checks=bypass)
        _oneshot(model, bench, [mod], calibrate=True)
        notes = ["no counterpart to our sink_weight (first token of each window x128 in the Hessian)"]
        return model, notes + (["bypass_divisibility_checks=True"] if bypass else [])

    return run


def llmc_awq(group: int, unpinned: bool = False) -> PeerFn:
    """AWQModifier (n_grid 20, its default duo scaling) then W4 asymmetric RTN with the found scales.
    unpinned: with the cache's pin_memory made a no-op. llm-compressor 0.14's AWQ always pins its
    cached activations, which a CPU-only torch refuses; pinning only speeds up copies to a GPU."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        recipe = [AWQModifier(n_grid=20), _quant_modifier(_ct_scheme(_ct_weights(4, group, False)))]
        no_pin = mock.patch.object(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None)
        with no_pin if unpinned else contextlib.nullcontext():
            _oneshot(model, bench, recipe, calibrate=True)
        notes = ["scales folded into the preceding norms/linears (duo_scaling=True)"]
        return model, notes + (["IntermediatesCache.pin_memory patched to a no-op"] if unpinned else [])

    return run


def llmc_rtn(group: int) -> PeerFn:
    """QuantizationModifier W4 asymmetric per group: plain min/max rounding, no data."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        _oneshot(model, bench, [_quant_modifier(_ct_scheme(_ct_weights(4, group, False)))], calibrate=False)
        return model, []

    return run


def llmc_smoothquant(static_acts: bool) -> PeerFn:
    """SmoothQuantModifier (alpha 0.5) + int8 per-channel weights with either the W8A8 preset's
    dynamic per-token activations or, like ours, one static per-tensor scale (global min/max)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        if static_acts:
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False,
                    "observer": "static_minmax"}
            quant, note = _quant_modifier(_ct_scheme(_ct_weights(8, None, True), acts)), "activations static per-tensor (static_minmax)"
        else:
            quant, note = _quant_modifier("W8A8"), "W8A8 preset: activations dynamic per-token"
        _oneshot(model, bench, [SmoothQuantModifier(smoothing_strength=0.5), quant], calibrate=True)
        return model, [note, "simulated in float (fake quantization)"]

    return run


def llmc_w8a8_dynamic(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """W8A8 preset without smoothing: int8 per-channel weights, dynamic per-token activations."""
    _oneshot(model, bench, [_quant_modifier("W8A8")], calibrate=False)
    return model, ["simulated in float (fake quantization)"]
