"""Baseline table: fp32 quality, size and latency of the built-in models, on the evaluation protocol (docs/design.md).

    python benchmarks/baseline.py --json out/baseline.json

smollm2-135m: perplexity on the lee-news evaluation split (512-token windows), latency 1 x 512.
minilm-l6: embedding cosine (1.0 by definition) and tweets linear-probe accuracy/F1, latency 32 x 128.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import harness  # benchmarks/harness.py: write_json

from slimformer.api import evaluate
from slimformer.evaluate.measure import EvalSettings
from slimformer.evaluate.report import metrics_table

MODELS = {
    "smollm2-135m": EvalSettings(data="lee-news", latency_batch=1, latency_seq=512),
    "minilm-l6": EvalSettings(data="tweets", latency_batch=32, latency_seq=128),
}


def run(threads: int | None, max_windows: int | None) -> dict:
    """Evaluate each built-in model and return {alias: result}."""
    results = {}
    for alias, settings in MODELS.items():
        settings.threads, settings.max_windows = threads, max_windows
        results[alias] = evaluate(alias, settings)
        print(f"\n## {alias} on {results[alias]['eval_data']}\n")
        print(metrics_table({alias: results[alias]["metrics"]}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/baseline.json", help="where to write the results")
    parser.add_argument("--threads", type=int, help="latency threads (default: torch's setting)")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N windows only")
    args = parser.parse_args()
    results = run(args.threads, args.max_windows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, results)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
