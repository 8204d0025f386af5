"""Our quantizers against peer libraries at the same settings, in one process.

    make peers   # once: llm-compressor, torchao, optimum-quanto, onnxruntime (requirements-peers.txt)
    .venv/bin/python benchmarks/peers.py --json out/peers.json [--max-windows N] [--calib-windows N]
        [--only gptq-g64 llm-compressor ...] [--skip Prototype ...]
        [--model smollm2-135m|gemma3-270m|DIR] [--calib-text lee-news] [--eval-texts lee-news shakespeare]

The model defaults to smollm2-135m, calibration and evaluation to `lee-news`; with several
--eval-texts every variant is evaluated on each (one table per text), calibrated on --calib-text.

Same protocol on both sides of every row (the evaluation protocol of docs/design.md, as in
benchmarks/quantization.py): perplexity with `slimformer.evaluate.perplexity` on the same
`lee-news` evaluation windows, every variant compressed from a fresh copy of the same fp32 model,
every data-driven method calibrated on the same token windows (the first N windows of 512 tokens of
the `lee-news` calibration pool), only the Linear layers inside the Transformer blocks quantized (the
LM head and embeddings stay fp32 on both sides). Compression time is the wall time of the
compression call alone (evaluation and, for onnxruntime, the shared ONNX export excluded; the export
time is reported as a note). Ratios are peer / ours: above 1 the peer is worse (ppl) or slower (s).

A peer that is not installed, or fails, gets a "cannot run: <reason>" row; the script goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

# llm-compressor logs every layer through loguru; read when it is imported. (Its _DISABLED switch
# would break GPTQ, which then logs at a level that was never registered.)
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' per-layer progress bars would bury the results

import torch
import transformers
from torch import nn

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import calibration_windows, lm_windows
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.layout import select_linears
from slimformer.models.loading import load_bundle
from slimformer.recipe import Recipe
from slimformer.registry import get_method

SEQ_LEN = 512


@dataclass
class Bench:
    """What every variant shares: the fp32 model, the evaluation and calibration windows."""

    model: nn.Module
    tokenizer: Any
    eval_windows: torch.Tensor  # of the first --eval-texts text: the "ppl" of every row
    calib_windows: torch.Tensor
    ctx: StepContext
    targets: list[str]  # full names of the Linear layers inside the blocks (the default targets, docs/design.md)
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)  # lazily built shared inputs (ONNX export...)
    eval_text: str = "lee-news"
    more_evals: dict[str, torch.Tensor] = field(default_factory=dict)  # the other --eval-texts


def evaluate(model: Any, bench: Bench) -> dict[str, Any]:
    """{"ppl": on the first evaluation text} plus {"ppl_by_text": every text} when there are several."""
    ppl = perplexity(model, bench.eval_windows, progress=False)["ppl"]
    if not bench.more_evals:
        return {"ppl": ppl}
    by_text = {bench.eval_text: ppl}
    by_text.update({t: perplexity(model, w, progress=False)["ppl"] for t, w in bench.more_evals.items()})
    return {"ppl": ppl, "ppl_by_text": by_text}


class PeerError(Exception):
    """A peer that cannot run at this setting, with the reason as its message."""


# A peer compresses a fresh copy of the fp32 model and returns what is evaluated (a module whose
# output has `.logits`, or the path of an ONNX file) plus notes on what it actually did.
PeerFn = Callable[[nn.Module, Bench], tuple[Any, list[str]]]


@dataclass(frozen=True)
class Peer:
    library: str  # the --only name of the library
    label: str  # what the table shows
    run: PeerFn


@dataclass(frozen=True)
class Setting:
    key: str  # the --only name of the setting
    label: str
    ours: tuple[str, ...]  # recipe YAMLs applied in turn; {n} is the calibration window count
    peers: tuple[Peer, ...]


# ---------------------------------------------------------------------------------------------
# llm-compressor


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
    """GPTQModifier, asymmetric, our GPTQ's defaults (damp 0.01, block 128, no act-order)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from llmcompressor.modifiers.gptq import GPTQModifier

        mod = GPTQModifier(config_groups=_ct_scheme(_ct_weights(bits, group, False)), ignore=["lm_head"],
                           dampening_frac=0.01, block_size=128, actorder=None, bypass_divisibility_checks=bypass)
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


# ---------------------------------------------------------------------------------------------
# torchao, torch.ao, optimum-quanto


def _only_targets(bench: Bench) -> Callable[[nn.Module, str], bool]:
    names = set(bench.targets)
    return lambda module, fqn: fqn in names


def _count_quantized(model: nn.Module, bench: Bench) -> int:
    """Target layers whose weight is no longer a plain tensor (torchao skips some silently)."""
    return sum(type(model.get_submodule(n).weight.data) is not torch.Tensor for n in bench.targets)


def _torchao(model: nn.Module, bench: Bench, config: Any) -> tuple[Any, list[str]]:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=_only_targets(bench))
    done = _count_quantized(model, bench)
    if done == 0:
        raise PeerError(f"{type(config).__name__} quantized none of the {len(bench.targets)} target layers")
    notes = [] if done == len(bench.targets) else [f"quantized {done} of {len(bench.targets)} layers, the rest left fp32"]
    return model, notes


def torchao_intx(group: int) -> PeerFn:
    """IntxWeightOnlyConfig int4, PerGroup, asymmetric: the generic (CPU-capable) weight-only path."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group),
                                      mapping_type=MappingType.ASYMMETRIC)
        return _torchao(model, bench, config)

    return run


def torchao_int4(group: int) -> PeerFn:
    """Int4WeightOnlyConfig (the main int4 API; its default packing targets GPU kernels)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from torchao.quantization import Int4WeightOnlyConfig

        model, notes = _torchao(model, bench, Int4WeightOnlyConfig(group_size=group))
        _smoke(model, bench)
        return model, notes

    return run


def torchao_int4_cpu(group: int) -> PeerFn:
    """The prototype CPU int4 (tinygemm layout, float zero points)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        model, notes = _torchao(model, bench, PrototypeInt4WeightOnlyConfig(group_size=group))
        _smoke(model, bench)
        return model, notes

    return run


def torchao_int8_dynamic(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """Int8DynamicActivationInt8WeightConfig: per-token int8 activations, per-channel int8 weights."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return _torchao(model, bench, Int8DynamicActivationInt8WeightConfig())


def torch_ao_dynamic(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """torch.ao.quantization.quantize_dynamic, qint8, per-channel weights, on the target layers."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {name: per_channel_dynamic_qconfig for name in bench.targets}
    model = quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model, ["activations dynamic per-tensor uint8 (fbgemm)"]


def quanto_groups_note() -> str:
    return ("optimum-quanto qint4 has no group-size option: it starts at 128 and steps down by 32 until "
            "the row length divides (SmolLM2: 96 for 576-wide rows, 128 for 1536-wide); see the "
            "rtn-quanto row")


def quanto_cannot(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    raise PeerError(quanto_groups_note())


def quanto_qint4(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """optimum-quanto qint4 weights (affine min/max, float shift), frozen."""
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=bench.targets)
    freeze(model)
    groups = sorted({(model.get_submodule(n).in_features, model.get_submodule(n).weight_group_size)
                     for n in bench.targets})
    return OutsideInferenceMode(model), [
        "groups used (row length: group): " + ", ".join(f"{k}: {g}" for k, g in groups),
        "evaluated under no_grad: its int4 weights fail under torch.inference_mode "
        "(RuntimeError: Cannot set version_counter for inference tensor)"]


class OutsideInferenceMode(nn.Module):
    """Runs the model under no_grad instead of the caller's inference_mode (same arithmetic)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return self.model(input_ids=input_ids.clone(), **kwargs)  # clone: a normal tensor, not an inference one


def _smoke(model: Any, bench: Bench) -> None:
    """One short forward pass, so a layout without a CPU kernel fails here, timed with the peer."""
    with torch.inference_mode():
        model(input_ids=bench.eval_windows[:1, :8], use_cache=False)


# ---------------------------------------------------------------------------------------------
# onnxruntime


class OrtLM(nn.Module):
    """An onnxruntime session behind the call `perplexity` makes: model(input_ids=...).logits."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # same threads as the torch side
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = self.session.run(None, {"input_ids": input_ids.numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


class _LogitsOnly(nn.Module):
    """forward(input_ids) -> logits, with an all-ones mask: without a mask, transformers 5 looks for
    packed sequences with `aten::diff`, which the TorchScript ONNX exporter cannot export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch. The default (torch.export-based) exporter
    would also need onnxscript; this one needs only onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings, a screen of them
        torch.onnx.export(_LogitsOnly(model).eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})


@dataclass(frozen=True)
class OnnxLM:
    """The exported fp32 LM and the MatMul nodes that quantizers may or may not touch."""

    path: Path
    export_s: float
    targets: list[str]  # the MatMuls of the target Linear layers (names follow the module path)
    others: list[str]  # every other MatMul: attention products, the LM head


def onnx_export(bench: Bench) -> OnnxLM:
    """The fp32 LM exported once per run (before any timed call); a failure is kept and re-raised."""
    if "onnx" not in bench.cache:
        path = bench.workdir / "smollm2-fp32.onnx"
        try:
            _, seconds = timed(lambda: _export(copy.deepcopy(bench.model), bench.eval_windows[:1], path))
            bench.cache["onnx"] = OnnxLM(path, seconds, *_split_matmuls(path, bench))
        except PeerError as exc:
            bench.cache["onnx"] = exc
        except Exception as exc:  # every onnxruntime row reports the same export failure
            bench.cache["onnx"] = PeerError(f"ONNX export failed: {type(exc).__name__}: {exc}")
    if isinstance(bench.cache["onnx"], PeerError):
        raise bench.cache["onnx"]
    return bench.cache["onnx"]


def _split_matmuls(path: Path, bench: Bench) -> tuple[list[str], list[str]]:
    import onnx

    matmuls = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMul"]
    suffixes = tuple({"/" + name.split(".")[-1] + "/MatMul" for name in bench.targets})
    targets = [name for name in matmuls if name.endswith(suffixes)]
    if len(targets) != len(bench.targets):
        raise PeerError(f"found {len(targets)} target MatMul nodes in the ONNX graph, expected {len(bench.targets)}")
    return targets, [name for name in matmuls if name not in set(targets)]


def ort_dynamic(reduce_range: bool) -> PeerFn:
    """onnxruntime quantize_dynamic: int8 per-channel weights, dynamic per-tensor uint8 activations.
    reduce_range keeps weights to 7 bits, which ORT advises on x86 without VNNI, where its U8S8
    integer kernels can saturate."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        lm = onnx_export(bench)
        out = bench.workdir / "ort-dynamic.onnx"
        quantize_dynamic(str(lm.path), str(out), per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_quantize=lm.targets)
        notes = ["activations dynamic per-tensor uint8", f"+ {lm.export_s:.0f} s shared ONNX export"]
        return out, notes + ([] if reduce_range else [f"this CPU {'has' if _has_vnni() else 'has no'} VNNI"])

    return run


def _has_vnni() -> bool:
    try:
        return any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    except OSError:
        return False


def ort_nbits(group: int) -> PeerFn:
    """onnxruntime MatMulNBitsQuantizer: 4-bit asymmetric RTN blocks of `group` (MatMulNBits op)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # it logs every node of the graph (7,000 lines) at INFO
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        lm = onnx_export(bench)
        quant = MatMulNBitsQuantizer(str(lm.path), bits=4, block_size=group, is_symmetric=False,
                                     nodes_to_exclude=lm.others)
        quant.process()
        out = bench.workdir / f"ort-nbits-g{group}.onnx"
        quant.model.save_model_to_file(str(out))
        return out, [f"+ {lm.export_s:.0f} s shared ONNX export"]

    return run


# ---------------------------------------------------------------------------------------------
# the settings


def w4(method: str, group: int, extra: str = "", bits: int = 4) -> str:
    return f"steps: [{{method: {method}, bits: {bits}, group_size: {group}, symmetric: false{extra}}}]"


CALIB = ", num_samples: {n}"
LLMC, TORCHAO, QUANTO, TORCH_AO, ORT = "llm-compressor", "torchao", "optimum-quanto", "torch.ao", "onnxruntime"

SETTINGS = (
    Setting("gptq-g64", "gptq w4 g64 asym", (w4("gptq", 64, CALIB),), (
        Peer(LLMC, "llm-compressor GPTQModifier", llmc_gptq(64)),
    )),
    Setting("gptq-g128", "gptq w4 g128 asym", (w4("gptq", 128, CALIB),), (
        Peer(LLMC, "llm-compressor GPTQModifier", llmc_gptq(128)),
        Peer(LLMC, "llm-compressor GPTQModifier (divisibility check bypassed)", llmc_gptq(128, bypass=True)),
    )),
    Setting("gptq-w3-g64", "gptq w3 g64 asym", (w4("gptq", 64, CALIB, bits=3),), (
        Peer(LLMC, "llm-compressor GPTQModifier", llmc_gptq(64, bits=3)),
    )),
    Setting("gptq-w3-g128", "gptq w3 g128 asym", (w4("gptq", 128, CALIB, bits=3),), (
        Peer(LLMC, "llm-compressor GPTQModifier", llmc_gptq(128, bits=3)),
    )),
    Setting("awq-g64", "awq w4 g64 asym", (w4("awq", 64, CALIB),), (
        Peer(LLMC, "llm-compressor AWQModifier + QuantizationModifier", llmc_awq(64)),
        Peer(LLMC, "llm-compressor AWQModifier + QuantizationModifier (pin_memory patched out)",
             llmc_awq(64, unpinned=True)),
    )),
    Setting("awq-g128", "awq w4 g128 asym", (w4("awq", 128, CALIB),), (
        Peer(LLMC, "llm-compressor AWQModifier + QuantizationModifier (pin_memory patched out)",
             llmc_awq(128, unpinned=True)),
    )),
    Setting("rtn-g64", "rtn w4 g64 asym", (w4("rtn", 64),), (
        Peer(LLMC, "llm-compressor QuantizationModifier", llmc_rtn(64)),
        Peer(TORCHAO, "torchao IntxWeightOnlyConfig(int4, PerGroup 64, asym)", torchao_intx(64)),
        Peer(TORCHAO, "torchao Int4WeightOnlyConfig(64)", torchao_int4(64)),
        Peer(TORCHAO, "torchao PrototypeInt4WeightOnlyConfig(64) (CPU)", torchao_int4_cpu(64)),
        Peer(QUANTO, "optimum-quanto qint4", quanto_cannot),
        Peer(ORT, "onnxruntime MatMulNBitsQuantizer(4 bit, block 64, asym)", ort_nbits(64)),
    )),
    Setting("rtn-g128", "rtn w4 g128 asym", (w4("rtn", 128),), (
        Peer(LLMC, "llm-compressor QuantizationModifier", llmc_rtn(128)),
        Peer(TORCHAO, "torchao IntxWeightOnlyConfig(int4, PerGroup 128, asym)", torchao_intx(128)),
        Peer(TORCHAO, "torchao Int4WeightOnlyConfig(128)", torchao_int4(128)),
        Peer(TORCHAO, "torchao PrototypeInt4WeightOnlyConfig(128) (CPU)", torchao_int4_cpu(128)),
        Peer(QUANTO, "optimum-quanto qint4", quanto_cannot),
        Peer(ORT, "onnxruntime MatMulNBitsQuantizer(4 bit, block 128, asym)", ort_nbits(128)),
    )),
    # quanto's own groups, reproduced on our side by two recipes (down_proj is the 1536-wide layer;
    # one recipe refuses two quantization steps even on disjoint layers)
    Setting("rtn-quanto", "rtn w4 asym, g96 (576-wide rows) / g128 (down_proj)", (
        w4("rtn", 128, ", targets: ['re:.*down_proj']"), w4("rtn", 96, ", ignore: ['down_proj']")), (
        Peer(QUANTO, "optimum-quanto qint4", quanto_qint4),
    )),
    Setting("w8a8-sq", "smoothquant a0.5 W8A8 (static per-tensor act)",
            ("steps: [{method: smoothquant, alpha: 0.5" + CALIB + "}]",), (
        Peer(LLMC, "llm-compressor SmoothQuantModifier + W8A8 static per-tensor act", llmc_smoothquant(True)),
        Peer(LLMC, "llm-compressor SmoothQuantModifier + W8A8 preset", llmc_smoothquant(False)),
    )),
    Setting("w8a8-dynamic", "dynamic W8A8 (per-token int8 act)", ("steps: [{method: dynamic}]",), (
        Peer(LLMC, "llm-compressor QuantizationModifier W8A8 preset", llmc_w8a8_dynamic),
        Peer(TORCHAO, "torchao Int8DynamicActivationInt8WeightConfig", torchao_int8_dynamic),
        Peer(TORCH_AO, "torch.ao quantize_dynamic (qint8, per-channel)", torch_ao_dynamic),
        Peer(ORT, "onnxruntime quantize_dynamic (QInt8, per-channel, reduce_range)", ort_dynamic(True)),
        Peer(ORT, "onnxruntime quantize_dynamic (QInt8, per-channel, full range)", ort_dynamic(False)),
    )),
)


# ---------------------------------------------------------------------------------------------
# running


def selected(only: list[str] | None, settings: tuple = (), libraries: Any = ()) -> list[tuple[Setting, list[Peer]]]:
    """Settings and peers named by --only (setting keys and/or library names; none named: all).
    `settings`/`libraries` default to this file's; a setting with no peer is kept unless a library
    was named (benchmarks/pruning.py has ours-only rows)."""
    settings = settings or SETTINGS
    libraries = sorted(libraries or {LLMC, TORCHAO, QUANTO, TORCH_AO, ORT})
    names = set(only or ())
    keys = {s.key for s in settings}
    unknown = names - keys - set(libraries)
    if unknown:
        raise SystemExit(f"--only: unknown name(s) {sorted(unknown)}; settings: {sorted(keys)}; libraries: {libraries}")
    want_settings, want_libs = names & keys, names - keys
    plan = []
    for s in settings:
        if want_settings and s.key not in want_settings:
            continue
        peers = [p for p in s.peers if not want_libs or p.library in want_libs]
        if peers or not want_libs:
            plan.append((s, peers))
    return plan

LIBRARY_MODULES = {LLMC: "llmcompressor", TORCHAO: "torchao.quantization", QUANTO: "optimum.quanto",
                   TORCH_AO: "torch.ao.quantization", ORT: "onnxruntime.quantization"}


def setup_peer(peer: Peer, bench: Bench) -> None:
    """Imports and shared inputs, before the timer starts: otherwise the first peer of a library
    would pay for importing it (llm-compressor: seconds), building the dataset, or the ONNX export."""
    importlib.import_module(LIBRARY_MODULES[peer.library])
    if peer.library == LLMC:
        _calib_dataset(bench)
    if peer.library == ORT:
        onnx_export(bench)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_ours(setting: Setting, bench: Bench) -> dict[str, Any]:
    """Our recipe on a fresh copy: ppl and compression seconds."""
    model = copy.deepcopy(bench.model)
    n = str(bench.calib_windows.shape[0])
    steps = [step for text in setting.ours for step in Recipe.from_yaml(text.replace("{n}", n)).steps]

    def compress() -> None:
        for step in steps:
            get_method(step.method).apply(model, step.config, bench.ctx)

    _, seconds = timed(compress)
    return {**evaluate(model, bench), "compress_s": round(seconds, 1)}


def run_peer(peer: Peer, bench: Bench) -> dict[str, Any]:
    """One peer on a fresh copy; any failure becomes {"error": reason}."""
    try:
        setup_peer(peer, bench)
        model = copy.deepcopy(bench.model)
        (evaluated, notes), seconds = timed(lambda: peer.run(model, bench))
        if isinstance(evaluated, Path):  # an ONNX file: the session is built outside the timing
            evaluated = OrtLM(evaluated)
        return {**evaluate(evaluated, bench), "compress_s": round(seconds, 1), "notes": notes}
    except PeerError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a peer library failing is a result, not a crash
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-8)}


def prepare(args: argparse.Namespace, workdir: Path) -> Bench:
    """The fp32 model and the windows named by --model, --calib-text, --eval-texts."""
    bundle = load_bundle(args.model)
    calib = load_data(args.calib_text, "calib")
    first, *others = args.eval_texts

    def windows(text: str) -> torch.Tensor:
        return lm_windows(bundle.tokenizer, load_data(text, "eval").joined(), SEQ_LEN, args.max_windows)

    return Bench(
        model=bundle.model, tokenizer=bundle.tokenizer, eval_windows=windows(first),
        calib_windows=calibration_windows(bundle.tokenizer, calib, args.calib_windows, SEQ_LEN),
        ctx=StepContext(tokenizer=bundle.tokenizer, calib=calib, progress=False),
        targets=list(select_linears(bundle.model, None)), workdir=workdir,
        eval_text=first, more_evals={t: windows(t) for t in others},
    )


def run(plan: list[tuple[Setting, list[Peer]]], bench: Bench) -> list[dict[str, Any]]:
    """Ours once per setting, then each peer; one row per (setting, peer), printed as it comes."""
    rows = []
    for setting, peers in plan:
        ours = run_ours(setting, bench)
        print(f"[{setting.key}] ours: ppl {ours['ppl']:.2f}, {ours['compress_s']} s", flush=True)
        if not peers:
            rows.append({"setting": setting.label, "key": setting.key, "ours": ours, "peer": "—", "library": None,
                         "error": "not run (--ours-only)"})
        for peer in peers:
            result = run_peer(peer, bench)
            rows.append({"setting": setting.label, "key": setting.key, "ours": ours, "peer": peer.label,
                         "library": peer.library, **result})
            if "ppl" in result:
                shown = f"ppl {result['ppl']:.2f}, {result['compress_s']} s" + "".join(f"; {n}" for n in result["notes"])
            else:
                shown = f"cannot run: {_one_line(result['error'])}"
            print(f"[{setting.key}] {peer.label}: {shown}", flush=True)
    return rows


def _on_text(result: dict[str, Any], text: str | None) -> dict[str, Any]:
    """`result` with "ppl" taken on evaluation text `text` (None: the first text)."""
    if text is None or "ppl" not in result:
        return result
    return {**result, "ppl": result["ppl_by_text"][text]}


def table(rows: list[dict[str, Any]], text: str | None = None) -> str:
    """Markdown: one row per (setting, peer); ratios peer / ours; notes listed below.
    text: which evaluation text's perplexity (None: the first)."""
    lines = ["| setting | ours ppl | peer | peer ppl | ppl ratio | ours s | peer s | time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        r = _on_text(r, text)
        ours = _on_text(r["ours"], text)
        if "ppl" in r:
            cells = [f"{r['ppl']:.2f}", f"{r['ppl'] / ours['ppl']:.3f}", f"{ours['compress_s']}", f"{r['compress_s']}",
                     f"{r['compress_s'] / max(ours['compress_s'], 0.1):.2f}"]
            notes += [f"- {r['peer']} ({r['setting']}): " + "; ".join(r["notes"])] if r.get("notes") else []
        else:
            cells = [f"cannot run: {_one_line(r['error'])}", "—", f"{ours['compress_s']}", "—", "—"]
        lines.append(f"| {r['setting']} | {ours['ppl']:.2f} | {r['peer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _one_line(text: str, limit: int = 300) -> str:
    """Table cells hold one line: newlines and pipes out, long messages cut (full text in the JSON)."""
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def run_benchmark(args: argparse.Namespace, plan: list, run_fn: Callable, prefix: str) -> None:
    """Prepare the model and windows, run `plan` through `run_fn`, print the table, write --json."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        bench = prepare(args, Path(tmp))
        fp32 = evaluate(bench.model, bench)
        evals = {bench.eval_text: bench.eval_windows, **bench.more_evals}
        shown = ", ".join(f"{t} {fp32.get('ppl_by_text', {t: fp32['ppl']})[t]:.2f} ({w.shape[0]} windows)"
                          for t, w in evals.items())
        print(f"{args.model}: fp32 ppl {shown}; calibration {bench.calib_windows.shape[0]} windows x {SEQ_LEN} "
              f"of {args.calib_text}; {torch.get_num_threads()} threads", flush=True)
        rows = run_fn(plan, bench)
    for text in evals:
        print(f"\n{text}:\n" + table(rows, text if bench.more_evals else None))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "max_windows": args.max_windows,
                               "model": args.model, "calib_text": args.calib_text,
                               "eval_windows": {t: int(w.shape[0]) for t, w in evals.items()},
                               "calib_windows": int(bench.calib_windows.shape[0]), "fp32_ppl": fp32["ppl"],
                               "fp32": fp32, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


def add_common_args(parser: argparse.ArgumentParser, json_default: str) -> None:
    """The options benchmarks/peers.py and benchmarks/pruning.py share."""
    parser.add_argument("--json", default=json_default)
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias or local Hugging Face folder")
    parser.add_argument("--calib-text", default="lee-news", help="text alias or folder the calibration windows come from")
    parser.add_argument("--eval-texts", nargs="+", default=["lee-news"], help="evaluation texts (first: the main one)")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N evaluation windows only")
    parser.add_argument("--calib-windows", type=int, default=64, help="calibration windows of 512 tokens (default 64)")
    parser.add_argument("--only", nargs="*", help="setting keys and/or library names to run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "out/peers.json")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out peers whose label contains any of these")
    parser.add_argument("--ours-only", action="store_true", help="run our side of the selected settings only")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    plan = [(s, [p for p in peers if not any(k in p.label for k in args.skip)]) for s, peers in selected(args.only)]
    plan = [(s, [] if args.ours_only else peers) for s, peers in plan if peers]
    run_benchmark(args, plan, run, "slimformer-peers-")

if __name__ == "__main__":
    main()
