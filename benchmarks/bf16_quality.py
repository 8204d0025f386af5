"""What compressing a bf16 checkpoint costs against the fp32 model, and where it comes from.

    python benchmarks/bf16_quality.py --json out/bf16-quality.json [--methods gptq sparsegpt awq]

SmolLM2-135M is cast to bf16 and saved (as Hub checkpoints are). Each method's recipe (the ones
of tests/models/test_bf16_model.py) runs three times: on the fp32 model, on the bf16 checkpoint
loaded as fp32, and on the bf16 checkpoint in bf16 (slimformer's bf16 path); the bf16 result is
evaluated in bf16 and again after `.float()`. Perplexity on the first lee-news windows.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: write_json
import torch

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.loading import load_bundle
from slimformer.recipe import Recipe

RECIPES = {  # method -> (recipe, evaluation windows): SparseGPT's masks need 24 windows to compare
    "gptq": ("steps: [{method: gptq, bits: 4, group_size: 128, num_samples: 4}]", 8),
    "sparsegpt": ("steps: [{method: sparsegpt, sparsity: 0.5, num_samples: 8}]", 24),
    "awq": ("steps: [{method: awq, bits: 4, group_size: 128, num_samples: 4}]", 8),
}


def measure(method: str, source, folder: Path, ctx: StepContext) -> dict:
    recipe, windows = RECIPES[method]
    steps = Recipe.coerce(recipe)
    ev = lm_windows(source.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows=windows)
    row: dict = {"method": method, "eval_windows": windows}
    runs = (("fp32_model", lambda: copy.deepcopy(source.model)),
            ("bf16_checkpoint_as_fp32", lambda: load_bundle(folder, tokenizer=False, dtype="float32").model),
            ("bf16_path", lambda: load_bundle(folder, tokenizer=False).model))
    for name, make in runs:
        model, start = make(), time.perf_counter()
        steps.apply(model, ctx)
        row[f"{name}_s"] = round(time.perf_counter() - start, 1)
        row[name] = perplexity(model, ev, progress=False)["ppl"]
        if model.dtype == torch.bfloat16:
            row["bf16_path_evaluated_fp32"] = perplexity(model.float(), ev, progress=False)["ppl"]
        del model
    row["ratio_bf16_path_to_fp32_model"] = row["bf16_path"] / row["fp32_model"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/bf16-quality.json")
    parser.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    source = load_bundle("smollm2-135m")
    ctx = StepContext(tokenizer=source.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        copy.deepcopy(source.model).to(torch.bfloat16).save_pretrained(folder)
        print(f"{'method':<10} {'windows':>7} {'fp32':>8} {'bf16->fp32':>10} {'bf16 path':>9} {'(eval fp32)':>11} "
              f"{'ratio':>7}")
        for method in args.methods:
            r = measure(method, source, folder, ctx)
            rows.append(r)
            print(f"{method:<10} {r['eval_windows']:>7} {r['fp32_model']:>8.3f} {r['bf16_checkpoint_as_fp32']:>10.3f} "
                  f"{r['bf16_path']:>9.3f} {r['bf16_path_evaluated_fp32']:>11.3f} "
                  f"{r['ratio_bf16_path_to_fp32_model']:>7.4f}", flush=True)
    harness.write_json(args.json, {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
