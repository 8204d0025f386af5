"""Peak resident memory of the calibration-based methods on smollm2-135m, each in a fresh process.

    python benchmarks/memory.py --json out/memory.json [--methods gptq awq] [--calib-windows 64]

The layer-wise engine keeps one block and its calibration activations in memory, so the peak
should stay near the fp32 model plus a few hundred MB (issue target: below fp32 size + 2 GB).
Each method runs in its own interpreter because a process's peak RSS (VmHWM) never goes down.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import harness  # benchmarks/harness.py: write_json

RECIPES = {
    "gptq": "steps: [{method: gptq, bits: 4, group_size: 128, num_samples: %d}]",
    "awq": "steps: [{method: awq, bits: 4, group_size: 128, num_samples: %d}]",
    "smoothquant": "steps: [{method: smoothquant, alpha: 0.5, num_samples: %d}]",
}

# run in a child interpreter: load, measure RSS, compress, measure peak RSS
CHILD = """
import json, sys, time

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.models.loading import load_bundle
from slimformer.models.placement import peak_memory
from slimformer.recipe import Recipe

def rss_now():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
bundle = load_bundle("smollm2-135m")
loaded = rss_now()
fp32_bytes = sum(p.numel() * 4 for p in bundle.model.parameters())  # counted before the layers are replaced
ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
start = time.perf_counter()
Recipe.from_yaml(sys.argv[1]).apply(bundle.model, ctx)
print(json.dumps({"rss_after_load_bytes": loaded, "peak_rss_bytes": peak_memory()["peak_rss_bytes"],
                  "fp32_model_bytes": fp32_bytes, "compress_s": round(time.perf_counter() - start, 1)}))
"""


def measure(method: str, calib_windows: int) -> dict:
    """Peak RSS of one method in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", CHILD, RECIPES[method] % calib_windows],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_minus_fp32_bytes"] = result["peak_rss_bytes"] - result["fp32_model_bytes"]
    result["within_target"] = result["peak_minus_fp32_bytes"] < 2 * 1024**3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/memory.json")
    parser.add_argument("--methods", nargs="*", default=["gptq", "awq"], choices=sorted(RECIPES))
    parser.add_argument("--calib-windows", type=int, default=64)
    args = parser.parse_args()
    results = {}
    print("| method | fp32 model (MB) | RSS after load (MB) | peak RSS (MB) | peak - fp32 (MB) | compress (s) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        r = results[method] = measure(method, args.calib_windows)
        print(f"| {method} W4 g128, {args.calib_windows} calib windows | {r['fp32_model_bytes'] / 1e6:.0f} | "
              f"{r['rss_after_load_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} | "
              f"{r['peak_minus_fp32_bytes'] / 1e6:.0f} | {r['compress_s']} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, {"calib_windows": args.calib_windows, "results": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
