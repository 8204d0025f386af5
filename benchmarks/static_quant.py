"""Static W8A8 observers and SmoothQuant side by side on smollm2-135m (perplexity on lee-news).

    python benchmarks/static_quant.py [--max-windows 8] [--num-samples 8] [--only NAME ...]
        [--json out/static.json] [--distribution out/dist]

Every variant starts from the same fp32 model in the same process. Perplexity runs the W8A8
layers' integer products as fp32 matmuls (`set_int_kernel(model, False)`: same numbers, while CPU
`torch._int_mm` was measured ~30x slower than fp32 on this AVX2 machine). `--distribution DIR` also
writes per-layer weight/activation stats of the fp32 model (distribution.json, distribution.md)
and histograms of a few layers (distribution.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
import harness  # benchmarks/harness.py: write_json

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.distribution import distribution_report, layer_distributions, plot_distributions
from slimformer.evaluate.perplexity import perplexity
from slimformer.layers import set_int_kernel
from slimformer.models.loading import load_bundle
from slimformer.recipe import Recipe

VARIANTS = {
    "fp32": None,
    "dynamic (W8A8 per token)": "{method: dynamic}",
    "static minmax": "{method: static}",
    "static percentile 99.99": "{method: static, a_observer: percentile}",
    "static mse": "{method: static, a_observer: mse}",
    "static kl": "{method: static, a_observer: kl}",
    "smoothquant a0.5": "{method: smoothquant, alpha: 0.5}",
    "smoothquant a0.8": "{method: smoothquant, alpha: 0.8}",
    "smoothquant a0.3": "{method: smoothquant, alpha: 0.3}",
}
PLOTTED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.29.mlp.down_proj")


def run(max_windows: int, num_samples: int, only: list[str] | None) -> dict[str, dict]:
    """Compress and evaluate each variant; return {variant: {"ppl", "compress_s"}}."""
    bundle = load_bundle("smollm2-135m")
    windows = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows)
    ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    results = {}
    for name, step in VARIANTS.items():
        if only and name not in only:
            continue
        model = copy.deepcopy(bundle.model)
        start = time.perf_counter()
        if step:
            step = step if "dynamic" in step else step.replace("}", f", num_samples: {num_samples}}}")
            Recipe.from_yaml(f"steps: [{step}]").apply(model, ctx)
        wall = time.perf_counter() - start
        set_int_kernel(model, False)  # same integer products as fp32 matmuls: CPU _int_mm is ~30x slower here
        ppl = perplexity(model, windows, progress=False)["ppl"]
        results[name] = {"ppl": ppl, "compress_s": round(wall, 1)}
        print(f"{name:28s} ppl {ppl:8.3f}  compress {wall:6.1f} s", flush=True)
    return results


def write_distribution(folder: Path, windows: int = 2) -> None:
    """Stats of every linear layer of the fp32 model on `windows` eval windows, plus histograms."""
    bundle = load_bundle("smollm2-135m")
    ids = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, windows)
    stats, hists = layer_distributions(bundle.model, ids, keep=PLOTTED)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "distribution.json").write_text(json.dumps(stats, indent=1))
    (folder / "distribution.md").write_text(distribution_report(stats) + "\n")
    plot_distributions({"fp32": (hists, stats)}, folder / "distribution.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--distribution", type=Path)
    args = parser.parse_args()
    if args.distribution:
        write_distribution(args.distribution)
    results = run(args.max_windows, args.num_samples, args.only)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
