"""Distillation, recovery and distributed training: the figures of docs/distillation.md.

    python benchmarks/distillation.py --json out/distillation.json            # all three parts
    python benchmarks/distillation.py --part encoder --steps 20 --json /tmp/d.json   # a short run
    python benchmarks/distillation.py --part encoder --seeds 3 ...   # students over 3 seeds, paired

(a) encoder: MiniLM-L6 + a mean-pool linear head fine-tuned on `tweets` (train split: 2,000 texts,
    seed 0), then 3-layer students (blocks 0, 2, 4 of the pretrained encoder, fresh head) trained
    with the teacher (KD) and without it (CE only): accuracy, macro-F1, size, latency (32 x 128).
(b) lm: smollm2-135m with 25% of the FFN neurons removed (`neurons` step), perplexity on lee-news
    before and after distillation recovery from the unpruned model (calibration pool, 256 tokens).
(c) ddp: the same `finetune` recipe through the CLI, 2 processes under torchrun (batch 2 each) vs
    1 process (batch 4): final perplexity of both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
import harness  # benchmarks/harness.py: write_json

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.latency import measure_latency
from slimformer.evaluate.perplexity import perplexity
from slimformer.evaluate.size import count_params
from slimformer.models.loading import load_bundle
from slimformer.train.classify import Classifier, fit, score, splits, student_of
from slimformer.train.data import lm_data
from slimformer.train.loop import train
from slimformer.train.task import TrainConfig
from slimformer.train.tasks import DistillTask


def encoder_part(steps: int, threads: int, teacher_lr: float, student_lr: float, kd: dict[str, Any],
                 seeds: int = 1) -> dict[str, Any]:
    """(a) teacher fine-tune, then distilled (DistillTask keys `kd`) vs plain 3-layer students; with
    seeds > 1, both students again for seeds 1.. (head init, data order, dropout) against the same
    teacher, and the paired accuracy/F1 differences (`seed_summary`)."""
    bundle = load_bundle("minilm-l6")
    train_set, test_set = splits(bundle.tokenizer, load_data("tweets", "train"), load_data("tweets", "test"))
    rows: dict[str, Any] = {}
    teacher = Classifier(copy.deepcopy(bundle.model), train_set.classes)
    opts = dict(steps=steps, batch_size=32, warmup_steps=max(1, steps // 10), weight_decay=0.01, seed=0)
    rows["teacher"] = _classifier_row(teacher, fit(teacher, train_set, TrainConfig(lr=teacher_lr, **opts)), test_set, threads)
    keep = [0, 2, 4]
    student = student_of(bundle.model, keep, train_set.classes)
    info = fit(student, train_set, TrainConfig(lr=student_lr, **opts), teacher=teacher, **kd)
    rows["student_distilled"] = _classifier_row(student, info, test_set, threads)
    plain = student_of(bundle.model, keep, train_set.classes)
    rows["student_no_teacher"] = _classifier_row(plain, fit(plain, train_set, TrainConfig(lr=student_lr, **opts)), test_set, threads)
    rows["retained_accuracy"] = rows["student_distilled"]["accuracy"] / rows["teacher"]["accuracy"]
    rows["distill_settings"] = kd
    pairs = [(rows["student_distilled"], rows["student_no_teacher"])]
    for seed in range(1, seeds):
        print(f"  seed {seed}", flush=True)
        seeded = {**opts, "seed": seed}
        student = student_of(bundle.model, keep, train_set.classes, seed=seed)
        info = fit(student, train_set, TrainConfig(lr=student_lr, **seeded), teacher=teacher, **kd)
        plain = student_of(bundle.model, keep, train_set.classes, seed=seed)
        pairs.append((_classifier_row(student, info, test_set, threads),
                      _classifier_row(plain, fit(plain, train_set, TrainConfig(lr=student_lr, **seeded)), test_set, threads)))
    if seeds > 1:
        rows["seeds"] = [{"seed": i, "distilled": {k: d[k] for k in ("accuracy", "f1")},
                          "no_teacher": {k: p[k] for k in ("accuracy", "f1")}} for i, (d, p) in enumerate(pairs)]
        rows["seed_summary"] = {k: _paired(pairs, k) for k in ("accuracy", "f1")}
        rows["seed_summary"]["retained_accuracy_mean"] = (
            statistics.mean(d["accuracy"] for d, _ in pairs) / rows["teacher"]["accuracy"])
    return rows


def _paired(pairs: list[tuple[dict, dict]], key: str) -> dict[str, float]:
    """Mean of each side over seeds, and of the per-seed difference (distilled - no teacher) with its
    standard error and how many seeds the distilled student won."""
    diffs = [d[key] - p[key] for d, p in pairs]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"distilled_mean": statistics.mean(d[key] for d, _ in pairs),
            "no_teacher_mean": statistics.mean(p[key] for _, p in pairs),
            "diff_mean": statistics.mean(diffs), "diff_se": se, "wins": sum(x > 0 for x in diffs), "seeds": len(diffs)}


def _classifier_row(model: Classifier, info: dict[str, Any], test_set: Any, threads: int) -> dict[str, Any]:
    row = {**score(model, test_set), **count_params(model), "size_bytes": 4 * count_params(model)["params"],
           "train_steps": info["steps"], "train_wall_s": info["train_wall_s"], "loss_last": info["loss_last"]}
    row.update(measure_latency(model, model.config.vocab_size, batch=32, seq=128, threads=threads))
    print(f"  {json.dumps({k: row[k] for k in ('accuracy', 'f1', 'params', 'latency_ms')})}", flush=True)
    return row


def lm_part(steps: int, max_windows: int | None, lr: float) -> dict[str, Any]:
    """(b) 25% FFN neurons removed, then distillation recovery from the unpruned model."""
    from slimformer.prune.structured import NeuronsConfig, neurons

    bundle = load_bundle("smollm2-135m")
    windows = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows)
    calib = load_data("lee-news", "calib")
    out: dict[str, Any] = {"fp32": {"ppl": perplexity(bundle.model, windows, progress=False)["ppl"], **count_params(bundle.model)}}
    work = copy.deepcopy(bundle.model)
    neurons(work, NeuronsConfig(sparsity=0.25), StepContext(tokenizer=bundle.tokenizer, kind="decoder", calib=calib, progress=False))
    out["neurons_25"] = {"ppl": perplexity(work, windows, progress=False)["ppl"], **count_params(work)}
    print(f"  {out}", flush=True)
    options = TrainConfig(steps=steps, lr=lr, batch_size=4, seq_len=256, warmup_steps=max(1, steps // 10), seed=0)
    work, info = train(work, DistillTask(bundle.model, alpha=1.0, temperature=1.0), lm_data(bundle.tokenizer, calib, 256),
                       options, progress=True)
    out["neurons_25_distilled"] = {"ppl": perplexity(work, windows, progress=False)["ppl"], **count_params(work),
                                   "train_steps": steps, "train_wall_s": info["train_wall_s"], "loss_first": info["loss_first"],
                                   "loss_last": info["loss_last"]}
    out["eval_windows"] = int(windows.shape[0])
    return out


def ddp_part(model: str, steps: int, max_windows: int) -> dict[str, Any]:
    """(c) 2 torchrun processes x batch 2 vs 1 process x batch 4, same recipe otherwise."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slimformer-ddp-") as tmp:
        for name, procs, batch in (("1_process", 1, 4), ("2_processes", 2, 2)):
            recipe = Path(tmp) / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump({"steps": [{"method": "finetune", "steps": steps, "lr": 2e-5, "batch_size": batch,
                                                         "seq_len": 256, "schedule": "constant"}]}))
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
            cmd = [*launcher, "-m", "slimformer", "compress", model, "--recipe", str(recipe), "--output", f"{tmp}/{name}",
                   "--max-windows", str(max_windows), "--no-latency", "--quiet"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            report = json.loads((Path(tmp) / name / "report.json").read_text())
            out[name] = {"ppl": report["compressed"]["ppl"], "baseline_ppl": report["baseline"]["ppl"],
                         "loss_last": report["steps"][0]["loss_last"], "global_batch": report["steps"][0]["global_batch"],
                         "world_size": report["steps"][0]["world_size"], "wall_s": round(time.perf_counter() - t0, 1)}
            print(f"  {name}: {out[name]}", flush=True)
    out["ppl_rel_diff"] = abs(out["2_processes"]["ppl"] / out["1_process"]["ppl"] - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["encoder", "lm", "ddp", "all"], default="all")
    parser.add_argument("--steps", type=int, help="optimizer steps for every training run (default: 300 / 200 / 20)")
    parser.add_argument("--max-windows", type=int, help="perplexity windows (default: all for lm, 8 for ddp)")
    parser.add_argument("--threads", type=int, default=2, help="latency threads")
    parser.add_argument("--ddp-model", default="smollm2-135m", help="model for part (c)")
    parser.add_argument("--kd-alpha", type=float, default=0.7, help="(a) weight of the soft loss")
    parser.add_argument("--kd-temperature", type=float, default=2.0, help="(a) softmax temperature")
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="(a) hidden-state MSE weight")
    parser.add_argument("--attention-weight", type=float, default=0.0, help="(a) attention-map KL weight")
    parser.add_argument("--layer-map", type=int, nargs=3, default=[0, 2, 4],
                        help="(a) teacher block each student block learns from (hidden/attention transfer)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="(a) train both students with this many seeds (same teacher) and report paired differences")
    parser.add_argument("--json", default="out/distillation.json")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("encoder", "all"):
        print("(a) encoder", flush=True)
        kd = {"alpha": args.kd_alpha, "temperature": args.kd_temperature, "hidden_weight": args.hidden_weight,
              "attention_weight": args.attention_weight, "student_layers": args.layer_map}
        results["encoder"] = encoder_part(args.steps or 300, args.threads, teacher_lr=5e-5, student_lr=1e-4, kd=kd,
                                         seeds=args.seeds)
    if args.part in ("lm", "all"):
        print("(b) lm", flush=True)
        results["lm"] = lm_part(args.steps or 200, args.max_windows, lr=5e-5)
    if args.part in ("ddp", "all"):
        print("(c) ddp", flush=True)
        results["ddp"] = ddp_part(args.ddp_model, args.steps or 20, args.max_windows or 8)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
