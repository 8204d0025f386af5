"""Quantizers side by side on smollm2-135m (evaluation protocol, docs/design.md): perplexity, size, compression time,
prefill latency.

    python benchmarks/quantization.py --json out/quantization.json [--max-windows 16]

Every variant starts from the same fp32 model in the same process; ratios are against fp32 and
against RTN at the same setting. SmolLM2's weights already sit on an asymmetric 4-bit grid of
group 32 (dequantized from Q4_1), so settings are compared at group 128, per channel and 3 bits.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import transformers
import harness  # benchmarks/harness.py: write_json

from slimformer.artifact import save_artifact
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.latency import measure_latency
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.loading import load_bundle
from slimformer.recipe import Recipe

VARIANTS = {
    "fp32": None,
    "rtn w8 per-channel": "steps: [{method: rtn, bits: 8, group_size: -1, symmetric: true}]",
    "dynamic int8 (W8A8, _int_mm)": "steps: [{method: dynamic}]",
    "static W8A8 minmax": "steps: [{method: static, a_observer: minmax}]",
    "static W8A8 percentile": "steps: [{method: static, a_observer: percentile}]",
    "static W8A8 mse": "steps: [{method: static, a_observer: mse}]",
    "static W8A8 kl": "steps: [{method: static, a_observer: kl}]",
    "smoothquant W8A8 a0.5": "steps: [{method: smoothquant, alpha: 0.5}]",
    "rtn w4 g128": "steps: [{method: rtn, bits: 4, group_size: 128}]",
    "gptq w4 g128": "steps: [{method: gptq, bits: 4, group_size: 128}]",
    "awq w4 g128": "steps: [{method: awq, bits: 4, group_size: 128}]",
    "mixed avg 4 bits g128": "steps: [{method: mixed, avg_bits: 4, group_size: 128}]",
    "rtn w4 g64": "steps: [{method: rtn, bits: 4, group_size: 64}]",
    "nf4 g64": "steps: [{method: nf4, group_size: 64}]",
    "log2 w4 g64": "steps: [{method: log2, bits: 4, group_size: 64}]",
    "rtn w4 per-channel": "steps: [{method: rtn, bits: 4, group_size: -1}]",
    "codebook w4": "steps: [{method: codebook, bits: 4}]",
    "rtn w3 g128": "steps: [{method: rtn, bits: 3, group_size: 128}]",
    "gptq w3 g128": "steps: [{method: gptq, bits: 3, group_size: 128}]",
}


def run(max_windows: int | None, only: list[str] | None, latency_runs: int) -> dict:
    """Compress and evaluate each variant; return {variant: metrics}."""
    bundle = load_bundle("smollm2-135m")
    windows = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows)
    ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    results = {}
    for name, recipe in VARIANTS.items():
        if only and name not in only:
            continue
        model = copy.deepcopy(bundle.model)
        start = time.perf_counter()
        if recipe:
            Recipe.from_yaml(recipe).apply(model, ctx)
        wall = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            size = save_artifact(model, Path(tmp), kind="decoder")
        ppl = perplexity(model, windows, progress=False)["ppl"]
        lat = measure_latency(model, bundle.model.config.vocab_size, batch=1, seq=512, runs=latency_runs)
        results[name] = {"ppl": ppl, "size_bytes": size, "compress_s": round(wall, 1), **lat}
        print(f"{name:30s} ppl {ppl:8.2f}  size {size / 1e6:7.1f} MB  compress {wall:6.1f} s  "
              f"prefill 1x512 {lat['latency_ms']:7.1f} ms", flush=True)
    return results


def table(results: dict) -> str:
    """Markdown table with ratios to fp32."""
    base = results.get("fp32")
    lines = ["| variant | ppl | ppl / fp32 | size (MB) | compress (s) | prefill 1×512 (ms) | speed vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "—"
        speed = f"{base['latency_ms'] / r['latency_ms']:.2f}×" if base else "—"
        lines.append(f"| {name} | {r['ppl']:.2f} | {ratio} | {r['size_bytes'] / 1e6:.1f} | {r['compress_s']} | "
                     f"{r['latency_ms']:.1f} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/quantization.json")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N evaluation windows only")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed prefill runs per variant (median)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    results = run(args.max_windows, args.only, args.latency_runs)
    print("\n" + table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(out, {"threads": torch.get_num_threads(), "max_windows": args.max_windows,
                               "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
