"""Deployment benchmark (issue 5), everything measured in one run, 2 threads by default.

    python benchmarks/deployment.py --json out/deployment.json --plot out/deployment [--part encoder|decoder|all]

(a) Encoder (`minilm-l6`), at batch 32 x 128 and 1 x 128: torch fp32, onnxruntime fp32, onnxruntime
    int8 dynamic (our `dynamic` step, per-tensor uint8 activations, exported as DynamicQuantizeLinear +
    MatMulInteger), onnxruntime int8 static QDQ (our `static` calibration on tweets, exported with our
    scales): latency ratios to torch fp32, embedding cosine to fp32, tweets probe accuracy. Goal: int8
    >= 3x faster than torch fp32 at batch 32 with cosine >= 0.98.
(b) Decoder (`smollm2-135m`): the machine's copy bandwidth (a `--copy-gib` tensor copy; GB/s counts the
    bytes read plus the bytes written, as STREAM's copy does), then fp32, int8 dynamic (our `dynamic`,
    per-token or per-tensor int8 activations) and int4 GPTQ (MatMulNBits with our codes; also with a
    4-bit RTN lm_head, which recipes leave fp32 by default; each once exact and once with
    `int4_compute="int8"`, MatMulNBits multiplying int8-quantized activations) exported to onnxruntime with
    a key/value cache: prefill 1 x `--prefill`, per-token decode after `--prefill` tokens, perplexity
    of each ONNX model on lee-news evaluation windows, and the fraction of the bandwidth limit decode
    reaches (weight bytes read per token / decode time, over the copy bandwidth). A torch fp32 row gives
    the same prefill/decode through PyTorch. Goal: int4 decode >= 2x faster than fp32 decode in onnxruntime.
Also a Pareto plot per model (quality vs size and vs latency), `<plot>_encoder.png`, `<plot>_decoder.png`.

Smoke run (tiny settings): `--quick`, and `--encoder DIR --decoder DIR` to point at small folders.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import encoder_int8  # benchmarks/encoder_int8.py: its dynamic-variant and ONNX-session helpers
import harness  # benchmarks/harness.py: write_json

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.bench import BenchSettings, bench_ort_decoding, bench_torch_decoding
from slimformer.evaluate.latency import measure_latency, time_calls, torch_threads
from slimformer.evaluate.measure import EvalSettings, measure, prepare_eval
from slimformer.evaluate.pareto import plot_pareto
from slimformer.evaluate.perplexity import perplexity
from slimformer.evaluate.report import environment
from slimformer.evaluate.size import folder_bytes
from slimformer.export.onnx import OrtModel, export_onnx, matmul_weight_bytes
from slimformer.models.loading import ModelBundle, load_bundle
from slimformer.recipe import Recipe


def apply_steps(model: nn.Module, steps: str, ctx: StepContext) -> nn.Module:
    """Run recipe steps given as a YAML flow list (e.g. "{method: dynamic}") on `model` in place."""
    Recipe.from_yaml(f"steps: [{steps}]").apply(model, ctx)
    return model


def copy_bandwidth(gib: float, repeats: int = 5, threads: int = 2) -> dict[str, float]:
    """Median GB/s of copying a `gib` GiB fp32 tensor into another (bytes read + bytes written)."""
    with torch_threads(threads):
        src = torch.ones(int(gib * 2**30) // 4)
        dst = torch.empty_like(src)
        times_ms = time_calls(lambda: dst.copy_(src), repeats, warmup=1)  # the warm-up touches every page
    return {"copy_gib": gib, "copy_GBps": round(2 * src.numel() * 4 / (statistics.median(times_ms) / 1e3) / 1e9, 2),
            "repeats": repeats}


# ---------------------------------------------------------------- (a) encoder


def _shrink(data: Any, texts: int, train: int, test: int) -> None:
    """Fewer texts for a smoke run (quality numbers then mean little)."""
    from slimformer.data.sources import TextData

    data.texts = data.texts[:texts]
    if data.probe_train is not None:
        cut = lambda d, n: TextData(d.name, d.texts[:n], d.labels[:n])  # noqa: E731
        data.probe_train, data.probe_test = cut(data.probe_train, train), cut(data.probe_test, test)


def run_encoder(args: argparse.Namespace) -> dict[str, Any]:
    base = load_bundle(args.encoder)
    settings = EvalSettings(data="tweets", latency_batch=32, latency_seq=128, latency_runs=args.runs,
                            threads=args.threads, progress=False)
    data = prepare_eval(base, settings)
    if args.quick:
        _shrink(data, 64, 200, 100)
    ctx = StepContext(tokenizer=base.tokenizer, kind="encoder", calib=load_data("tweets", "calib"), progress=False)
    static = f"{{method: static, num_samples: {args.static_samples}, seq_len: 128}}"
    variants = {
        "torch fp32": None,
        "onnxruntime fp32": encoder_int8._onnx(None, "enc-fp32"),
        "onnxruntime int8 dynamic (ours)": encoder_int8._onnx(encoder_int8._ours("tensor"), "enc-dynamic"),
        "onnxruntime int8 static QDQ (ours)": encoder_int8._onnx(lambda m: apply_steps(m, static, ctx), "enc-static"),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, apply in variants.items():
        start = time.perf_counter()
        model = apply(copy.deepcopy(base.model)) if apply else copy.deepcopy(base.model)
        wall = time.perf_counter() - start
        metrics = measure(ModelBundle(model, base.tokenizer, base.kind, name), data, settings)
        small = measure_latency(model, base.model.config.vocab_size, batch=1, seq=128, runs=args.runs,
                                threads=args.threads)
        metrics.update({"latency_1x128_ms": small["latency_ms"], "prepare_s": round(wall, 2),
                        "size_bytes": model.path.stat().st_size if isinstance(model, OrtModel) else folder_bytes(base.folder)})
        results[name] = metrics
        print(f"  {name:38s} 32x128 {metrics['latency_ms']:8.1f} ms  1x128 {metrics['latency_1x128_ms']:7.2f} ms  "
              f"cosine {metrics['cosine']:.4f}  probe acc {metrics.get('accuracy', float('nan')):.4f}", flush=True)
        del model
    # torch fp32 once more, last: a drift check on the reference every ratio divides by
    again = measure_latency(base.model, base.model.config.vocab_size, batch=32, seq=128, runs=args.runs,
                            threads=args.threads)
    results["torch fp32"]["latency_ms_again_at_end"] = again["latency_ms"]
    print(f"  torch fp32 again at the end: 32x128 {again['latency_ms']:8.1f} ms", flush=True)
    ref = results["torch fp32"]
    for m in results.values():
        m["speedup_32x128"] = round(ref["latency_ms"] / m["latency_ms"], 3)
        m["speedup_1x128"] = round(ref["latency_1x128_ms"] / m["latency_1x128_ms"], 3)
    int8 = [m for n, m in results.items() if "int8" in n]
    goal = any(m["speedup_32x128"] >= 3 and m["cosine"] >= 0.98 for m in int8)
    return {"model": args.encoder, "threads": args.threads, "results": results,
            "goal": {"text": "int8 >= 3x faster than torch fp32 at 32x128 with cosine >= 0.98", "met": goal}}


def encoder_table(part: dict[str, Any]) -> str:
    rows = ["| variant | 32×128 (ms) | speedup | 1×128 (ms) | speedup | cosine | probe accuracy | size (MB) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in part["results"].items():
        rows.append(f"| {name} | {m['latency_ms']:.1f} | {m['speedup_32x128']:.2f}× | {m['latency_1x128_ms']:.2f} | "
                    f"{m['speedup_1x128']:.2f}× | {m['cosine']:.4f} | {m.get('accuracy', float('nan')):.4f} | "
                    f"{m['size_bytes'] / 1e6:.1f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- (b) decoder


def decoder_variants(args: argparse.Namespace) -> dict[str, tuple[tuple[str, ...], str]]:
    """name -> (recipe steps, MatMulNBits compute): fp32, int8 dynamic, int4 GPTQ with and without a
    4-bit lm_head, with exact or int8 compute."""
    gptq = (f"{{method: gptq, bits: 4, group_size: {args.group_size}, num_samples: {args.gptq_samples}, "
            f"seq_len: {args.gptq_seq_len}}}")
    lm_head = f"{{method: rtn, bits: 4, group_size: {args.group_size}, targets: [lm_head]}}"
    # the last variant adds a 4-bit lm_head (RTN) to the GPTQ model: the fp32 lm_head is 113 of the
    # ~170 MB an int4 SmolLM2 decode step reads, so it bounds the decode speedup
    # "int8 compute": the same 4-bit files with MatMulNBits accuracy_level 4 (int8 activations)
    int4 = f"int4 GPTQ g{args.group_size}"
    return {"fp32": ((), "fp32"), "int8 dynamic (per-token)": (("{method: dynamic}",), "fp32"),
            "int8 dynamic (per-tensor)": (("{method: dynamic, activations: tensor}",), "fp32"),
            int4: ((gptq,), "fp32"), f"{int4} + int4 lm_head": ((gptq, lm_head), "fp32"),
            f"{int4}, int8 compute": ((gptq,), "int8"),
            f"{int4} + int4 lm_head, int8 compute": ((gptq, lm_head), "int8")}


def run_decoder(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bandwidth = copy_bandwidth(args.copy_gib, threads=args.threads)
    print(f"  copy bandwidth: {bandwidth['copy_GBps']} GB/s ({args.copy_gib} GiB copy)", flush=True)
    base = load_bundle(args.decoder)
    vocab = int(base.model.config.vocab_size)
    windows = lm_windows(base.tokenizer, load_data("lee-news", "eval").joined(), 512, args.max_windows)
    ctx = StepContext(tokenizer=base.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    timing = BenchSettings(runtime="onnxruntime", runs=args.runs, warmup=args.warmup, prefill=args.prefill,
                           threads=args.threads)
    variants = decoder_variants(args)
    # compressed models (and their seconds) kept for the other variants whose steps start with theirs
    done: dict[tuple[str, ...], tuple[nn.Module, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        torch_fp32 = bench_torch_decoding_threads(base.model, vocab, timing)
    results["torch fp32 (reference)"] = {**torch_fp32, "size_bytes": folder_bytes(base.folder)}
    print(f"  {'torch fp32 (reference)':28s} prefill {torch_fp32['prefill']['median_ms']:8.1f} ms  decode "
          f"{torch_fp32['decode']['median_ms']:7.2f} ms/token", flush=True)
    for name, (steps, compute) in variants.items():
        if args.variants and not any(v in name for v in args.variants):
            continue
        start = time.perf_counter()
        prefix = max((k for k in done if steps[:len(k)] == k), key=len, default=())
        model, earlier_s = done[prefix] if prefix else (base.model, 0.0)
        model = copy.deepcopy(model)
        for i in range(len(prefix), len(steps)):  # one recipe per step (a recipe holds one quantization step)
            apply_steps(model, steps[i], ctx)
            cut = steps[:i + 1]
            if any(other != name and s[:len(cut)] == cut for other, (s, _) in variants.items()):
                done[cut] = (copy.deepcopy(model), time.perf_counter() - start + earlier_s)
        compress_s = time.perf_counter() - start + earlier_s
        path = workdir / f"dec-{len(results)}.onnx"
        export_onnx(model, "decoder", path, kv_cache=True, int4_compute=compute)
        del model
        ort = OrtModel(path, "decoder", threads=args.threads)
        timed = bench_ort_decoding(ort, vocab, timing)
        ppl = perplexity(ort, windows, progress=False)
        weight_bytes = matmul_weight_bytes(path)
        decode_s = timed["decode"]["median_ms"] / 1e3
        results[name] = {**timed, "ppl": ppl["ppl"], "ppl_windows": ppl["windows"], "size_bytes": path.stat().st_size,
                         "weight_bytes_per_token": weight_bytes, "compress_s": round(compress_s, 1),
                         "bandwidth_fraction": round(weight_bytes / decode_s / (bandwidth["copy_GBps"] * 1e9), 3)}
        r = results[name]
        print(f"  {name:28s} prefill {r['prefill']['median_ms']:8.1f} ms  decode {r['decode']['median_ms']:7.2f} ms/token  "
              f"ppl {r['ppl']:.2f}  weights/token {weight_bytes / 1e6:.0f} MB  {r['bandwidth_fraction']:.0%} of bandwidth",
              flush=True)
        del ort
        path.unlink()
    ort_fp32 = results.get("fp32")
    for r in results.values():
        if ort_fp32:
            r["decode_speedup_vs_ort_fp32"] = round(ort_fp32["decode"]["median_ms"] / r["decode"]["median_ms"], 3)
            r["prefill_speedup_vs_ort_fp32"] = round(ort_fp32["prefill"]["median_ms"] / r["prefill"]["median_ms"], 3)
    int4_rows = [r for n, r in results.items() if n.startswith("int4")]
    goal = bool(ort_fp32 and any(r["decode_speedup_vs_ort_fp32"] >= 2 for r in int4_rows))
    return {"model": args.decoder, "threads": args.threads, "bandwidth": bandwidth, "prefill": args.prefill,
            "results": results, "goal": {"text": "int4 decode >= 2x faster than fp32 decode in onnxruntime", "met": goal}}


def bench_torch_decoding_threads(model: nn.Module, vocab: int, timing: BenchSettings) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(timing.threads or previous)
    try:
        return bench_torch_decoding(model, vocab, timing)
    finally:
        torch.set_num_threads(previous)


def decoder_table(part: dict[str, Any]) -> str:
    rows = ["| variant | prefill 1×{p} (ms) | decode (ms/token) | decode speedup | ppl (ORT) | size (MB) | "
            "weights read/token (MB) | of bandwidth |".format(p=part["prefill"]), "|---|---|---|---|---|---|---|---|"]
    for name, r in part["results"].items():
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "—"
        wpt = f"{r['weight_bytes_per_token'] / 1e6:.0f}" if "weight_bytes_per_token" in r else "—"
        frac = f"{r['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in r else "—"
        rows.append(f"| {name} | {r['prefill']['median_ms']:.1f} | {r['decode']['median_ms']:.2f} | "
                    f"{r.get('decode_speedup_vs_ort_fp32', float('nan')):.2f}× | {ppl} | {r['size_bytes'] / 1e6:.1f} | "
                    f"{wpt} | {frac} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main


def plots(report: dict[str, Any], stem: Path) -> list[str]:
    written = []
    if "encoder" in report:
        points = [{"name": n, "cosine": m["cosine"], "size_bytes": m["size_bytes"], "latency_ms": m["latency_ms"]}
                  for n, m in report["encoder"]["results"].items()]
        path = stem.with_name(stem.name + "_encoder.png")
        plot_pareto(points, "cosine", path, lower_quality_better=False,
                    title=f"{report['encoder']['model']}: embedding cosine vs size vs latency (32×128)")
        written.append(str(path))
    if "decoder" in report:
        points = [{"name": n, "ppl": r.get("ppl"), "size_bytes": r["size_bytes"], "latency_ms": r["decode"]["median_ms"]}
                  for n, r in report["decoder"]["results"].items() if "ppl" in r]
        path = stem.with_name(stem.name + "_decoder.png")
        plot_pareto(points, "ppl", path, lower_quality_better=True,
                    title=f"{report['decoder']['model']} in onnxruntime: perplexity vs size vs decode latency (ms/token)")
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("out/deployment.json"))
    parser.add_argument("--plot", type=Path, default=Path("out/deployment"), help="PNG stem (_encoder/_decoder.png)")
    parser.add_argument("--part", choices=["encoder", "decoder", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed runs after warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--encoder", default="minilm-l6")
    parser.add_argument("--decoder", default="smollm2-135m")
    parser.add_argument("--static-samples", type=int, default=64, help="calibration windows for `static`")
    parser.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: all)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--gptq-samples", type=int, default=64)
    parser.add_argument("--gptq-seq-len", type=int, default=512)
    parser.add_argument("--copy-gib", type=float, default=1.0)
    parser.add_argument("--variants", nargs="*", help="decoder variants to run (substrings; default all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few texts for the encoder quality metrics")
    args = parser.parse_args()
    report: dict[str, Any] = {"environment": environment(), "settings": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="slimformer-deployment-") as tmp:  # ONNX files go with it
        encoder_int8.THREADS, encoder_int8._WORKDIR = args.threads, Path(tmp)
        if args.part in ("encoder", "all"):
            print(f"(a) {args.encoder}, {args.threads} threads", flush=True)
            report["encoder"] = run_encoder(args)
        if args.part in ("decoder", "all"):
            print(f"(b) {args.decoder}, {args.threads} threads", flush=True)
            report["decoder"] = run_decoder(args, Path(tmp))
    for part, table in (("encoder", encoder_table), ("decoder", decoder_table)):
        if part in report:
            goal = report[part]["goal"]
            print(f"\n{report[part]['model']}:\n\n{table(report[part])}\n\ngoal ({goal['text']}): "
                  f"{'met' if goal['met'] else 'NOT met'}")
    if "decoder" in report:
        print(f"\ncopy bandwidth {report['decoder']['bandwidth']['copy_GBps']} GB/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, args.plot)
    harness.write_json(args.json, report)
    print(f"\nwrote {args.json}, {', '.join(report['plots'])}")


if __name__ == "__main__":
    main()
