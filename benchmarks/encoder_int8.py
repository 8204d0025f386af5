"""MiniLM-L6 int8 dynamic quantization vs fp32, in one run: latency at batch 32 x sequence 128,
embedding cosine to fp32 and tweets linear-probe accuracy (evaluation protocol, docs/design.md).

    python benchmarks/encoder_int8.py --json out/encoder_int8.json [--threads 2] [--runs 20]

Variants, each on a fresh copy of the same fp32 model:
- slimformer `dynamic` with `activations: tensor` (PyTorch's quantized engine, uint8 x int8),
- slimformer `dynamic` with `activations: token` (per-token scales, `torch._int_mm`; its latency is
  timed on fewer runs, `--int-mm-runs`, because `_int_mm` is a slow reference loop on CPUs
  without VNNI; its quality is measured on the exact fp32 form of the same integer product),
- the peer `torch.ao.quantization.quantize_dynamic` (qint8 Linear, the same engine),
- onnxruntime: the fp32 model exported to ONNX, our `dynamic` layers exported with our int8 codes
  and scales (`slimformer.export.onnx`: DynamicQuantizeLinear + MatMulInteger for per-tensor
  activations, per-row int8 for per-token), and the peer `onnxruntime.quantization.quantize_dynamic`
  applied to the fp32 ONNX file (per-channel int8 weights). Export time counts in
  `compress_s`, not in latency.
Speedups are ratios to the torch fp32 latency measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
import harness  # benchmarks/harness.py: write_json

from slimformer.evaluate.measure import EvalSettings, measure, prepare_eval
from slimformer.export.onnx import OrtModel, export_onnx
from slimformer.models.loading import ModelBundle, load_bundle
from slimformer.quant.dynamic import DynamicConfig, dynamic


def _torch_quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _ours(activations: str) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        dynamic(model, DynamicConfig(activations=activations))
        return model
    return apply


_WORKDIR = Path(tempfile.gettempdir())  # main() points this at a temporary folder removed after the run
THREADS = 2  # set from --threads before any variant runs


def _onnx(then: Callable[[nn.Module], nn.Module] | None, name: str) -> Callable[[nn.Module], nn.Module]:
    """Compress with `then` (or not), export to ONNX, return the onnxruntime session as a model."""
    def apply(model: nn.Module) -> nn.Module:
        config = model.config
        model = then(model) if then else model
        path = export_onnx(model, "encoder", _WORKDIR / f"{name}.onnx")["path"]
        return OrtModel(path, "encoder", config=config, threads=THREADS)
    return apply


def _ort_quantize_dynamic(model: nn.Module) -> nn.Module:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = model.config
    fp32 = export_onnx(model, "encoder", _WORKDIR / "peer-fp32.onnx")["path"]
    out = _WORKDIR / "peer-ort-dynamic.onnx"
    quantize_dynamic(fp32, str(out), weight_type=QuantType.QInt8, per_channel=True)
    return OrtModel(out, "encoder", config=config, threads=THREADS)


VARIANTS: dict[str, Callable[[nn.Module], nn.Module] | None] = {
    "fp32": None,
    "slimformer dynamic, per-tensor activations (quantized engine)": _ours("tensor"),
    "slimformer dynamic, per-token activations (torch._int_mm)": _ours("token"),
    "peer: torch.ao quantize_dynamic (qint8)": _torch_quantize_dynamic,
    "onnxruntime fp32": _onnx(None, "fp32"),
    "onnxruntime: slimformer dynamic, per-tensor activations": _onnx(_ours("tensor"), "ours-tensor"),
    "onnxruntime: slimformer dynamic, per-token activations": _onnx(_ours("token"), "ours-token"),
    "peer: onnxruntime quantize_dynamic (QInt8, per-channel)": _ort_quantize_dynamic,
}


def run(threads: int, runs: int, int_mm_runs: int, only: list[str] | None) -> dict:
    """Measure every variant; returns {variant: metrics} with `speedup` vs fp32."""
    base = load_bundle("minilm-l6")
    settings = EvalSettings(data="tweets", latency_batch=32, latency_seq=128, latency_runs=runs, threads=threads,
                            progress=False)
    data = prepare_eval(base, settings)
    results: dict[str, dict] = {}
    for name, apply in VARIANTS.items():
        if only and name != "fp32" and not any(o in name for o in only):
            continue
        model = copy.deepcopy(base.model)
        start = time.perf_counter()
        model = apply(model) if apply else model
        wall = time.perf_counter() - start
        bundle = ModelBundle(model, base.tokenizer, base.kind, name)
        settings.latency_runs = int_mm_runs if "_int_mm" in name else runs
        metrics = measure(bundle, data, settings)
        metrics["compress_s"] = round(wall, 2)
        results[name] = metrics
        fp32 = results["fp32"]["latency_ms"]
        print(f"{name:62s} latency {metrics['latency_ms']:8.1f} ms ({fp32 / metrics['latency_ms']:5.2f}x)  "
              f"cosine {metrics['cosine']:.4f}  probe acc {metrics.get('accuracy', float('nan')):.4f}", flush=True)
    for metrics in results.values():
        metrics["speedup"] = round(results["fp32"]["latency_ms"] / metrics["latency_ms"], 3)
    return results


def table(results: dict) -> str:
    """Markdown table of the run."""
    rows = ["| variant | latency 32x128 (ms) | speedup vs fp32 | cosine | probe accuracy | probe F1 |",
            "|---|---|---|---|---|---|"]
    for name, m in results.items():
        rows.append(f"| {name} | {m['latency_ms']:.1f} | {m['speedup']:.2f}x | {m['cosine']:.4f} | "
                    f"{m.get('accuracy', float('nan')):.4f} | {m.get('f1', float('nan')):.4f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/encoder_int8.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="latency runs after warm-up (median reported)")
    parser.add_argument("--int-mm-runs", type=int, default=3, help="latency runs for the _int_mm variant")
    parser.add_argument("--only", nargs="*", help="substrings of variant names (fp32 always runs)")
    args = parser.parse_args()
    global THREADS, _WORKDIR
    THREADS = args.threads
    with tempfile.TemporaryDirectory(prefix="slimformer-encoder-int8-") as tmp:  # the ONNX files go with it
        _WORKDIR = Path(tmp)
        results = run(args.threads, args.runs, args.int_mm_runs, args.only)
    print("\n" + table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, {"threads": args.threads, "torch": torch.__version__, "results": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
