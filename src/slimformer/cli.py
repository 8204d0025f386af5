"""`slimformer` command line: parse arguments, build a recipe, call the API. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimformer.errors import UserError
from slimformer.outputs import write_text_atomic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimformer", description="Compress Transformer models and measure the result.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_compress, _add_evaluate, _add_export, _add_bench):
        add(sub)
    return parser


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", metavar="DATA", help="evaluation data: lee-news, tweets, or a .txt/.jsonl/.csv path")
    p.add_argument("--max-windows", type=int, help="evaluate perplexity on the first N 512-token windows only")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--latency-seq", type=int, default=128)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--decode-context", type=int, default=512,
                   help="decoders: time one-token decode after a prompt of this many tokens (0: skip; default 512)")
    p.add_argument("--threads", type=int, help="threads for latency (default: torch's current setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _placement_options(p)


def _placement_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the math runs (default auto: a GPU when torch sees one); layer-wise methods move "
                        "one block at a time there while the model stays in host memory")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="what a Hugging Face folder loads in (default auto: the checkpoint's own dtype)")


def _add_compress(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compress", help="compress MODEL with a recipe and write DIR")
    c.add_argument("model", help="built-in alias (smollm2-135m, minilm-l6) or a local Hugging Face folder")
    c.add_argument("--recipe", required=True, help="recipe YAML file")
    c.add_argument("--output", required=True, help="output folder (written atomically)")
    c.add_argument("--calib", metavar="DATA", help="calibration data (default: lee-news / tweets)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: layer-wise steps (GPTQ/AWQ/...) from their last finished "
                        "block, training steps from their last checkpoint (checkpoint_every)")
    c.add_argument("--distribution", action="store_true",
                   help="per-layer weight/activation stats of the input and compressed model on 2 evaluation "
                        "windows: a report section and distribution.png")
    c.add_argument("--no-step-metrics", action="store_true",
                   help="recipes of several steps: skip measuring the model after each step (only before and after)")
    _eval_options(c)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="measure a model or a compressed folder")
    e.add_argument("model", help="alias, Hugging Face folder, slimformer output folder, or .gguf file (llama.cpp)")
    e.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    _eval_options(e)


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="export a model or compressed folder for another runtime (ONNX) or as a "
                                      "plain Hugging Face folder")
    x.add_argument("model", help="alias, Hugging Face folder, or slimformer output folder")
    x.add_argument("--format", default="onnx", choices=["onnx", "gguf", "compressed-tensors", "hf"],
                   help="onnx: one .onnx file; gguf: one .gguf file for llama.cpp/ollama (our codes as Q4_0/Q4_1/"
                        "Q5_0/Q5_1/Q8_0); compressed-tensors: a folder vLLM and transformers read (our codes "
                        "packed); hf: a plain Hugging Face folder with dequantized weights (default: onnx)")
    x.add_argument("--unquantized", default="f32", choices=["f32", "f16", "q8_0"],
                   help="gguf: how layers without integer codes are stored (q8_0: llama.cpp's own 8-bit rounding)")
    x.add_argument("--output", required=True, help="output file (onnx) or folder (hf), written atomically")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype of an hf folder (default: float32)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--kv-cache", action="store_true",
                   help="onnx, decoders: add past/present key/value tensors for incremental decoding (bench decode)")
    x.add_argument("--int4-compute", default="fp32", choices=["fp32", "int8"],
                   help="onnx, 4-bit layers (MatMulNBits): fp32 = exact (default); int8 = onnxruntime quantizes "
                        "their inputs to int8 per block and multiplies in integers (much faster decode, slightly "
                        "less exact)")
    x.add_argument("--threads", type=int, help="onnxruntime threads for the parity check")
    x.add_argument("--json", metavar="FILE", help="also write the export summary as JSON")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="latency and throughput of one or more models (torch or onnxruntime)")
    b.add_argument("models", nargs="+", metavar="MODEL_OR_DIR",
                   help="alias, Hugging Face folder, slimformer output folder, or .onnx file (onnxruntime)")
    b.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="for folders and aliases: torch, or onnxruntime (exported to a temporary ONNX file first); "
                        "an .onnx file always runs in onnxruntime")
    b.add_argument("--batch", type=int, default=1, help="forward batch size (default 1)")
    b.add_argument("--seq", type=int, default=128, help="forward sequence length (default 128)")
    b.add_argument("--threads", type=int, help="threads (default: torch's current setting)")
    b.add_argument("--runs", type=int, default=20, help="timed runs; the median is reported (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    b.add_argument("--prefill", type=int, default=512,
                   help="decoders: prefill length, and the context of per-token decode (default 512; 0 skips)")
    b.add_argument("--compare", action="store_true", help="one side-by-side table with ratios to the first model")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _placement_options(b)


def _settings(args: argparse.Namespace):  # -> EvalSettings
    from slimformer.evaluate.measure import EvalSettings

    for name in ("max_windows", "latency_batch", "latency_seq", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.decode_context < 0:
        raise UserError(f"--decode-context must be 0 (skip) or a positive number of tokens, got {args.decode_context}.")
    return EvalSettings(
        data=args.eval, max_windows=args.max_windows, latency=not args.no_latency,
        latency_batch=args.latency_batch, latency_seq=args.latency_seq, threads=args.threads,
        decode_context=args.decode_context,
        progress=not args.quiet, distribution=getattr(args, "distribution", False),
        step_metrics=not getattr(args, "no_step_metrics", False),
    )


def _run(args: argparse.Namespace) -> int:
    import transformers

    transformers.logging.set_verbosity_error()  # the CLI owns this process: keep its output readable
    transformers.utils.logging.disable_progress_bar()
    json_out = _json_output(args)  # checked before any work: a bad --json path fails in a second
    command = {"compress": _compress, "evaluate": _evaluate, "bench": _bench, "export": _export}[args.command]
    result = command(args)
    if json_out and result is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2))
    return 0


def _compress(args: argparse.Namespace) -> None:
    from slimformer import api
    from slimformer.evaluate.report import metrics_table, stage_columns

    report = api.compress(
        args.model, Path(args.recipe), calib=args.calib, eval=_settings(args),
        output=args.output, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume,
        device=args.device, dtype=args.dtype,
    )
    if "compressed" not in report:  # a torchrun rank other than 0: rank 0 reports and writes
        return
    print(f"\n{report['model']} on {report['eval_data']}:\n")
    print(api.summary_table(report))
    stages = stage_columns(report)
    if len(stages) > 2:
        print("\nafter each stage:\n")
        print(metrics_table(stages))
    print(f"\nwrote {args.output} in {report['wall_s']:.1f} s")


def _evaluate(args: argparse.Namespace) -> dict:
    from slimformer import api
    from slimformer.evaluate.report import metrics_table

    result = api.evaluate(args.model, _settings(args), device=args.device, dtype=args.dtype)
    print(f"\n{result['model']} on {result['eval_data']}:\n")
    print(metrics_table({result["model"]: result["metrics"]}))
    return result


def _bench(args: argparse.Namespace) -> dict:
    from slimformer.evaluate.bench import BenchSettings, bench, compare_table

    settings = BenchSettings(runtime=args.runtime, batch=args.batch, seq=args.seq, threads=args.threads,
                             runs=args.runs, warmup=args.warmup, prefill=args.prefill, device=args.device,
                             dtype=args.dtype)
    report = bench(args.models, settings, progress=print)
    if args.compare:
        print("\n" + compare_table(report))
    else:
        for result in report["results"]:
            print("\n" + compare_table({"settings": report["settings"], "results": [result]}, ratios=False))
    return report


def _export(args: argparse.Namespace) -> dict:
    """`slimformer export`: the format's own options to `api.export`, then its one-screen summary."""
    from slimformer import api

    options = {"hf": {"dtype": args.dtype}, "compressed-tensors": {},
               "gguf": {"threads": args.threads, "unquantized": args.unquantized},
               "onnx": {"threads": args.threads, "kv_cache": args.kv_cache, "int4_compute": args.int4_compute}}
    result = api.export(args.model, args.output, format=args.format, overwrite=args.overwrite,
                        **options[args.format])
    {"hf": _print_hf, "compressed-tensors": _print_compressed, "gguf": _print_gguf, "onnx": _print_onnx}[
        args.format](result)
    return result


def _print_hf(result: dict) -> None:
    print(f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB, {result['dtype']} weights, "
          f"{result['layers_dequantized']} quantized layers dequantized, "
          f"{result['input_scales_folded']} input scales folded into weights")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if "parity" in result:
        p = result["parity"]
        print(f"plain transformers vs slimformer on real inputs: cosine {p['cosine']:.6f}, "
              f"max |error| {p['max_abs_err']:.3g}")


def _print_compressed(result: dict) -> None:
    groups = "; ".join(f"{g['scheme']} x {g['layers']}" for g in result["config_groups"])
    print(f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB, {result['quant_format']} ({groups}), "
          f"{len(result['layers_float'])} layers left in float")
    for warning in result["warnings"]:
        print(f"warning: {warning}")


def _print_gguf(result: dict) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result["tensors"].items()))
    print(f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB ({kinds}), {result['layers_from_codes']} "
          f"layers carried from their integer codes, {result['seconds']} s")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")
    p = result["parity"]
    if p is None:
        print("llama.cpp is not installed (`make llamacpp`): the file was not run here")
    else:
        print(f"llama.cpp vs PyTorch on real inputs: cosine {p['cosine']:.6f}, max |error| {p['max_abs_err']:.3g}, "
              f"top-1 agreement {p['top1_agreement']:.3f}")


def _print_onnx(result: dict) -> None:
    p = result["parity"]
    print(f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB, opset {result['opset']}, "
          f"{result['layers_swapped']} quantized layers exported, {result['seconds']} s")
    print(f"onnxruntime vs PyTorch on real inputs: cosine {p['cosine']:.6f}, max |error| {p['max_abs_err']:.3g}, "
          f"mean |error| {p['mean_abs_err']:.3g}")


def _json_output(args: argparse.Namespace) -> Path | None:
    """The --json file, checked: its folder exists and is writable, and it is not inside an input."""
    from slimformer.models.loading import resolve_folder
    from slimformer.outputs import check_file_output, protected_paths

    if not getattr(args, "json", None):
        return None
    specs = args.models if args.command == "bench" else [args.model]
    inputs = [resolve_folder(s) for s in specs if not str(s).endswith((".onnx", ".gguf"))]
    return check_file_output(args.json, protected=protected_paths(*inputs), what="--json")


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 on bad input, 1 on internal failure."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        print(f"slimformer: error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return 2
    except KeyboardInterrupt:
        resumable = " (rerun with --resume to continue from the last finished block)" if getattr(args, "output", None) else ""
        print(f"slimformer: interrupted; no output was written{resumable}.", file=sys.stderr)
        return 130
    except Exception as exc:  # internal failure: short message unless --debug
        if args.debug:
            raise
        print(f"slimformer: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
