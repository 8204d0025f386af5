"""Structured pruning (heads / neurons physically removed), before and after recovery, on the
evaluation protocol of docs/design.md.

    python benchmarks/structured.py --json out/structured.json [--models smollm2-135m minilm-l6]
        [--threads 2] [--runs 20] [--calib-samples 64] [--eval-windows N] [--recover-steps N]

- smollm2-135m: fp32, `neurons` 25% and `heads` 25% (each on a fresh copy): parameters, prefill
  latency 1 x 512, perplexity on lee-news (all evaluation windows unless --eval-windows).
- minilm-l6: fp32 and `heads` 25% + `neurons` 25%: parameters, latency 32 x 128, embedding cosine
  to fp32 and the tweets probe accuracy.
Speedups are latency ratios to the fp32 model measured in the same run. `--recover-steps N` then runs
a `finetune` step of N steps on the pruned model (next-token loss on the lee-news calibration pool,
or the tweets task loss for the encoder, `--recover-lr`) and measures its quality again in a
"+ finetune N" row; its shapes are unchanged, so its latency is the pruned row's.
`--interleave N` then times fp32 and every pruned variant again in N rounds, one forward each per
round in turn, so that drift of the machine (another job, clock, memory) falls on all of them
alike: `latency_interleaved_ms` (median over rounds) and `speedup_interleaved`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import harness  # benchmarks/harness.py: write_json

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.evaluate.measure import DEFAULT_CALIB, EvalSettings, measure, prepare_eval
from slimformer.models.loading import ModelBundle, load_bundle
from slimformer.recipe import Recipe

SETTINGS = {  # latency shape per model (docs/design.md / issue 4)
    "smollm2-135m": {"latency_batch": 1, "latency_seq": 512},
    "minilm-l6": {"latency_batch": 32, "latency_seq": 128},
}


def variants(model: str, calib_samples: int) -> dict[str, list[dict[str, Any]]]:
    """The pruning recipes (steps) measured for `model`."""
    n = {"num_samples": calib_samples}
    if model == "minilm-l6":
        return {"heads 25% + neurons 25%": [
            {"method": "heads", "sparsity": 0.25, "score": "taylor", **n, "seq_len": 128},
            {"method": "neurons", "sparsity": 0.25, "score": "activation", **n, "seq_len": 128},
        ]}
    return {
        "neurons 25%": [{"method": "neurons", "sparsity": 0.25, "score": "activation", **n}],
        "heads 25%": [{"method": "heads", "sparsity": 0.25, "scope": "global", "score": "taylor", **n}],
    }


def apply_steps(model: Any, bundle: ModelBundle, steps: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    """Run recipe `steps` on `model` in place; what they reported (plus timing)."""
    ctx = StepContext(tokenizer=bundle.tokenizer, kind=bundle.kind, calib=load_data(DEFAULT_CALIB[bundle.kind], "calib"),
                      progress=progress)
    start = time.perf_counter()
    infos = [{k: v for k, v in info.items() if k not in ("method", "wall_s", "structure", "layer_scores", "removed_heads")}
             for info in Recipe.from_dict({"steps": steps}).apply(model, ctx)]
    return {"steps": infos, "compress_s": round(time.perf_counter() - start, 2)}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(name)
    settings = EvalSettings(max_windows=args.eval_windows, threads=args.threads, latency_runs=args.runs,
                            progress=args.progress, **SETTINGS[name])
    data = prepare_eval(bundle, settings)
    rows = {"fp32": measure(bundle, data, settings)}
    models = {"fp32": bundle.model}
    for label, steps in variants(name, args.calib_samples).items():
        model = models[label] = copy.deepcopy(bundle.model)
        info = apply_steps(model, bundle, steps, args.progress)
        rows[label] = {**measure(ModelBundle(model, bundle.tokenizer, bundle.kind, name), data, settings), **info}
        rows[label]["speedup"] = round(rows["fp32"]["latency_ms"] / rows[label]["latency_ms"], 3)
        print(name, label, _line(rows[label]), flush=True)
        if args.recover_steps:
            tuned = f"{label} + finetune {args.recover_steps}"
            step = {"method": "finetune", "steps": args.recover_steps, "lr": args.recover_lr,
                    "warmup_steps": max(1, args.recover_steps // 10)}
            info = apply_steps(model, bundle, [step], args.progress)
            quality = measure(ModelBundle(model, bundle.tokenizer, bundle.kind, name), data, replace(settings, latency=False))
            rows[tuned] = {**rows[label], **quality, "recover": info}
            print(name, tuned, _line(rows[tuned]), flush=True)
    if args.interleave:  # the recovered models have their pruned row's shapes: timed as such
        times = interleaved_latency(models, model_inputs(bundle.model, settings), args.interleave, args.threads)
        for label, ms in times.items():
            rows[label]["latency_interleaved_ms"] = ms
            rows[label]["speedup_interleaved"] = round(times["fp32"] / ms, 3)
            print(name, label, f"interleaved latency_ms={ms:.4g} speedup={times['fp32'] / ms:.3f}", flush=True)
    print(name, "fp32", _line(rows["fp32"]), flush=True)
    return rows


def model_inputs(model: Any, settings: EvalSettings) -> dict[str, torch.Tensor]:
    """The fixed random token ids (and an all-ones mask) of `measure_latency`'s shape."""
    ids = torch.randint(0, model.config.vocab_size, (settings.latency_batch, settings.latency_seq),
                        generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def interleaved_latency(models: dict[str, Any], inputs: dict[str, torch.Tensor], rounds: int, threads: int) -> dict[str, float]:
    """Median ms of one forward per model over `rounds` rounds, the models taking turns in each round."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kwargs = {name: {**inputs, "use_cache": False} if hasattr(m, "generate") else inputs for name, m in models.items()}
        for name, m in models.items():  # warm-up
            for _ in range(3):
                m.eval()(**kwargs[name])
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(**kwargs[name])
                times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return {name: statistics.median(t) for name, t in times.items()}


def _line(row: dict[str, Any]) -> str:
    keys = ("params", "ppl", "cosine", "accuracy", "latency_ms", "speedup", "compress_s")
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="latency runs (median reported)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows for the scores")
    parser.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default: all)")
    parser.add_argument("--recover-steps", type=int, default=0, help="finetune steps after pruning (0: none)")
    parser.add_argument("--recover-lr", type=float, default=5e-5, help="peak learning rate of that finetune")
    parser.add_argument("--interleave", type=int, default=0,
                        help="then time fp32 and the pruned models in turn for N rounds (0: skip)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {name: run_model(name, args) for name in args.models}
    results["settings"] = vars(args) | {"json": str(args.json)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
