"""QAT vs PTQ on smollm2-135m (evaluation protocol, docs/design.md): GPTQ alone against QAT initialised from the same
GPTQ result (or, with --init rtn, from RTN) and trained with distillation from the fp32 model; RTN
and fp32 for reference.

    python benchmarks/qat.py --json out/qat.json [--bits 3 --group-size 128] [--steps 100]
        [--max-windows 16] [--lr 5e-5] [--batch-size 4] [--num-samples 64] [--seq-len 512]

Training and GPTQ use the same calibration windows (the first `--num-samples` windows of the
lee-news calibration pool); perplexity is on the evaluation text only (documents 150-299), 512-token
windows. Every variant starts from the same fp32 model in the same process; each quantized model is
saved as an artifact to measure its size (QAT's is the same packed format as GPTQ's).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import harness  # benchmarks/harness.py: write_json

from slimformer.artifact import save_artifact
from slimformer.config import build_config
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.loading import load_bundle
from slimformer.registry import get_method


@dataclass(frozen=True)
class Settings:
    """Quantization scheme, calibration/training windows, QAT training and evaluation settings."""

    bits: int = 3
    group_size: int = 128
    init: str = "gptq"
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    warmup_steps: int = 5
    temperature: float = 1.0
    alpha: float = 1.0
    num_samples: int = 64
    seq_len: int = 512
    max_windows: int | None = None
    only: tuple[str, ...] = ()
    progress: bool = False


def recipes(s: Settings) -> dict[str, tuple[str, dict[str, Any]] | None]:
    """{variant: (method, settings)} at the requested bit width and group size."""
    scheme = {"bits": s.bits, "group_size": s.group_size, "symmetric": False}
    calib = {"num_samples": s.num_samples, "seq_len": s.seq_len}
    train = {"steps": s.steps, "lr": s.lr, "batch_size": s.batch_size, "warmup_steps": s.warmup_steps,
             "temperature": s.temperature, "alpha": s.alpha}
    tag = f"w{s.bits} g{s.group_size}"
    return {
        "fp32": None,
        f"rtn {tag}": ("rtn", scheme),
        f"gptq {tag}": ("gptq", {**scheme, **calib}),
        f"qat {tag} ({s.init} init, lsq, kd)": ("qat", {**scheme, **calib, **train, "init": s.init, "lsq": True}),
    }


def run(settings: Settings) -> dict[str, dict[str, Any]]:
    """Compress and evaluate each variant; return {variant: metrics}."""
    bundle = load_bundle("smollm2-135m")
    windows = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, settings.max_windows)
    ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=settings.progress)
    results = {}
    for name, spec in recipes(settings).items():
        if settings.only and not any(name.startswith(o) for o in settings.only):
            continue
        model = copy.deepcopy(bundle.model)
        start = time.perf_counter()
        info: dict[str, Any] = {}
        if spec is not None:
            method = get_method(spec[0])
            info = method.apply(model, build_config(method.config_cls, spec[1], spec[0]), ctx)
        wall = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            size = save_artifact(model, Path(tmp), kind="decoder")
        ppl = perplexity(model, windows, progress=False)["ppl"]
        results[name] = {"ppl": ppl, "size_bytes": size, "compress_s": round(wall, 1),
                         **{k: info[k] for k in ("loss_first", "loss_last", "train_wall_s") if k in info}}
        print(f"{name:36s} ppl {ppl:8.2f}  size {size / 1e6:7.1f} MB  compress {wall:7.1f} s", flush=True)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table with ratios to fp32."""
    base = results.get("fp32")
    lines = ["| variant | ppl | ppl / fp32 | size (MB) | compress (s) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "—"
        lines.append(f"| {name} | {r['ppl']:.2f} | {ratio} | {r['size_bytes'] / 1e6:.1f} | {r['compress_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/qat.json")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--init", choices=("gptq", "rtn"), default="gptq", help="the PTQ result QAT starts from")
    parser.add_argument("--steps", type=int, default=100, help="QAT optimizer steps")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the KD term (1 - alpha: next-token loss)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration/training windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/training window")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N evaluation windows only")
    parser.add_argument("--only", nargs="*", help="variants whose name starts with one of these (fp32, rtn, gptq, qat)")
    parser.add_argument("--progress", action="store_true", help="progress bars for GPTQ and training")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    settings = Settings(**{k: v for k, v in vars(args).items() if k != "json"} | {"only": tuple(args.only or ())})
    results = run(settings)
    print("\n" + table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(out, {"threads": torch.get_num_threads(), "settings": asdict(settings), "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
