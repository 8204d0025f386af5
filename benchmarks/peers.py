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
import copy
import importlib
import os
import traceback
from pathlib import Path
from typing import Any

# llm-compressor logs every layer through loguru; read when it is imported. (Its _DISABLED switch
# would break GPTQ, which then logs at a level that was never registered.)
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' per-layer progress bars would bury the results

import harness  # benchmarks/harness.py: prepare, run_ours, evaluate, table, JSON
import transformers
from harness import Bench, Peer, PeerError, Setting, evaluate, one_line, run_ours, timed
from peer_llmcompressor import (
    _calib_dataset, llmc_awq, llmc_gptq, llmc_rtn, llmc_smoothquant, llmc_w8a8_dynamic,
)
from peer_onnxruntime import OrtLM, onnx_export, ort_dynamic, ort_nbits
from peer_quanto import quanto_cannot, quanto_qint4
from peer_torchao import torch_ao_dynamic, torchao_int4, torchao_int4_cpu, torchao_int8_dynamic, torchao_intx



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


def selected(only: list[str] | None) -> list[tuple[Setting, list[Peer]]]:
    """This file's settings and peers named by --only (see `harness.selected`)."""
    return harness.selected(only, SETTINGS, LIBRARY_MODULES)


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


def run(plan: list[tuple[Setting, list[Peer]]], bench: Bench) -> list[dict[str, Any]]:
    """Ours once per setting, then each peer; one row per (setting, peer), printed as it comes."""
    rows = []
    for setting, peers in plan:
        ours = run_ours(setting, bench)
        print(f"[{setting.key}] ours: {harness.ppl_line(ours)}, {ours['compress_s']} s", flush=True)
        if not peers:
            rows.append({"setting": setting.label, "key": setting.key, "ours": ours, "peer": "—", "library": None,
                         "error": "not run (--ours-only)"})
        for peer in peers:
            result = run_peer(peer, bench)
            rows.append({"setting": setting.label, "key": setting.key, "ours": ours, "peer": peer.label,
                         "library": peer.library, **result})
            if "ppl" in result:
                shown = f"{harness.ppl_line(result)}, {result['compress_s']} s" + "".join(f"; {n}" for n in result["notes"])
            else:
                shown = f"cannot run: {one_line(result['error'])}"
            print(f"[{setting.key}] {peer.label}: {shown}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser, "out/peers.json")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out peers whose label contains any of these")
    parser.add_argument("--ours-only", action="store_true", help="run our side of the selected settings only")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    plan = [(s, [p for p in peers if not any(k in p.label for k in args.skip)]) for s, peers in selected(args.only)]
    plan = [(s, [] if args.ours_only else peers) for s, peers in plan if peers]
    harness.run_benchmark(args, plan, run, "slimformer-peers-")


if __name__ == "__main__":
    main()
