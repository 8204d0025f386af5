"""llama.cpp side by side (issue 16): llama.cpp's own GGUF files against ours, in one run.

    python benchmarks/llamacpp.py --json out/llamacpp.json [--max-windows 16] [--variants ...]

Needs llama.cpp: `make llamacpp` (the Python runtime) and `make llamacpp-tools` (llama.cpp's own
converter `convert_hf_to_gguf.py`, `llama-quantize` and `llama-imatrix`, built from the same pinned
sdist into .venv/llama.cpp). Without the tools, llama.cpp's rows are quantized through the runtime's
`llama_model_quantize` from our own F32 export, and the importance-matrix rows are left out (stated).

1. Files. llama.cpp's: its converter writes F32 from the Hugging Face folder, its quantizer writes
   Q8_0, Q4_0, Q4_1 and Q4_K_M, and the same with its importance matrix computed by `llama-imatrix`
   on our calibration windows. Ours: RTN, GPTQ (and AWQ, SparseGPT) codes written into the same block
   types by `export_gguf`, with the token embedding in the type llama.cpp's own Q4_0 file gives it.
2. Quality: perplexity from llama.cpp's logits on the same token windows for every file (lee-news
   evaluation text, tokenized by the Hugging Face tokenizer, `--max-windows`).
3. Speed, alone and interleaved: `--rounds` rounds, each timing every file once (prefill 1 x
   `--prefill`, then per-token decode on that cache), plus torch fp32 and our best ONNX 4-bit export
   (RTN g32 symmetric, MatMulNBits with int8 compute) in the same rounds; the median over rounds.
Nothing else may run on the machine meanwhile: llama.cpp's OpenMP threads spin, and timings taken
beside another job were 10x off here.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deployment import apply_steps, bench_torch_decoding_threads  # benchmarks/deployment.py
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.evaluate.bench import BenchSettings, bench_ort_decoding
from slimformer.evaluate.llamacpp import GgufModel, import_llama_cpp
from slimformer.evaluate.perplexity import perplexity
from slimformer.evaluate.report import environment
from slimformer.export.gguf import export_gguf
from slimformer.export.onnx import OrtModel, export_onnx
from slimformer.models.loading import load_bundle

ROOT = Path(__file__).resolve().parents[1]
THEIRS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K_M")
THEIRS_IMATRIX = ("Q4_0", "Q4_K_M")


def ours(samples: int, seq_len: int) -> dict[str, str]:
    """Our variants: name -> recipe steps (YAML flow list); the GGUF type follows from the codes."""
    cal = f"num_samples: {samples}, seq_len: {seq_len}"
    sym = "bits: 4, symmetric: true, scale_rule: signed_max"  # Q4_0's own grid: d = max / -8
    asym = "bits: 4, symmetric: false, zero_point: float"  # Q4_1's own grid: a free fp16 minimum
    rows = {}
    methods = (("RTN", "rtn", ""), ("GPTQ", "gptq", f", {cal}"), ("GPTQ+search", "gptq", f", {cal}, scale_search: true"),
               ("AWQ", "awq", f", {cal}, fold: true"))
    for label, method, extra in methods:
        for kind, rule, groups in (("Q4_0", sym, (32,)), ("Q4_1", asym, (32, 64, 128))):
            for g in groups:
                rows[f"{label} {kind} g{g}"] = f"{{method: {method}, {rule}, group_size: {g}{extra}}}"
    rows["SparseGPT 50% + 4-bit Q4_0 g32"] = (f"{{method: sparsegpt, sparsity: 0.5, bits: 4, group_size: 32, "
                                             f"symmetric: true, {cal}}}")
    return rows


class Tools:
    """llama.cpp's converter and quantization tools (from `make llamacpp-tools`), where present."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.convert = root / "src" / "convert_hf_to_gguf.py"
        self.quantize = root / "bin" / "llama-quantize"
        self.imatrix = root / "bin" / "llama-imatrix"

    def has(self, what: str) -> bool:
        return getattr(self, what).is_file()

    def run(self, cmd: list[str], **env: str) -> float:
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{done.stderr[-3000:]}")
        return round(time.perf_counter() - start, 2)


def llama_f32(tools: Tools, bundle: Any, out: Path) -> dict[str, Any]:
    """llama.cpp's F32 file: its converter on the Hugging Face folder (else our own F32 export)."""
    if tools.has("convert"):
        s = tools.run([sys.executable, str(tools.convert), str(bundle.folder), "--outtype", "f32", "--outfile",
                       str(out)], PYTHONPATH=str(tools.root / "src" / "gguf-py"))
        return {"path": out, "made_by": "llama.cpp convert_hf_to_gguf.py", "seconds": s}
    info = export_gguf(bundle.model, bundle.tokenizer, out, unquantized="f32")
    return {"path": out, "made_by": "slimformer export_gguf (llama.cpp's converter not built)", "seconds": info["seconds"]}


def llama_quantize(tools: Tools, src: Path, dst: Path, kind: str, threads: int, imatrix: Path | None = None) -> float:
    """llama.cpp's quantizer: the `llama-quantize` tool, else the runtime's `llama_model_quantize`."""
    if tools.has("quantize"):
        extra = ["--imatrix", str(imatrix)] if imatrix else []
        return tools.run([str(tools.quantize), *extra, str(src), str(dst), kind, str(threads)])
    if imatrix:
        raise SystemExit("an importance matrix needs the llama-quantize tool: `make llamacpp-tools`")
    lib = import_llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{kind}"), threads
    start = time.perf_counter()
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize to {kind} failed")
    return round(time.perf_counter() - start, 2)


def importance_matrix(tools: Tools, f32: Path, calib: torch.Tensor, tokenizer: Any, out: Path, threads: int) -> float:
    """llama-imatrix on our calibration windows (decoded back to text, one chunk per window)."""
    text = out.with_suffix(".txt")
    text.write_text("".join(tokenizer.decode(w, skip_special_tokens=True) for w in calib.tolist()))
    return tools.run([str(tools.imatrix), "-m", str(f32), "-f", str(text), "-o", str(out), "-c",
                      str(calib.shape[1]), "--chunks", str(calib.shape[0]), "-t", str(threads)])


def embedding_type(path: Path) -> str:
    """The ggml type of token_embd in a GGUF file, as an `unquantized` choice of export_gguf."""
    from gguf import GGUFReader

    kind = next(t.tensor_type.name for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return {"F32": "f32", "F16": "f16"}.get(kind, "q8_0")


def make_files(args: argparse.Namespace, bundle: Any, work: Path) -> dict[str, dict[str, Any]]:
    """Every GGUF file of the comparison, with how it was made and what it took."""
    tools, files = Tools(args.tools), {}
    f32 = llama_f32(tools, bundle, work / "llama-F32.gguf")
    files["llama.cpp F32"] = {**f32, "compress_s": 0.0}
    for kind in THEIRS:
        path = work / f"llama-{kind}.gguf"
        files[f"llama.cpp {kind}"] = {"path": path, "made_by": "llama.cpp quantize",
                                      "compress_s": llama_quantize(tools, f32["path"], path, kind, args.threads)}
    calib = lm_windows(bundle.tokenizer, load_data(args.calib, "calib").joined(), args.seq_len, args.samples,
                       purpose="calibration")
    if tools.has("imatrix") and tools.has("quantize"):
        imatrix = work / "imatrix.gguf"
        seconds = importance_matrix(tools, f32["path"], calib, bundle.tokenizer, imatrix, args.threads)
        for kind in THEIRS_IMATRIX:
            path = work / f"llama-{kind}-imatrix.gguf"
            s = llama_quantize(tools, f32["path"], path, kind, args.threads, imatrix)
            files[f"llama.cpp {kind} + imatrix"] = {"path": path, "made_by": "llama.cpp imatrix + quantize",
                                                   "compress_s": round(seconds + s, 2)}
    else:
        print("  (llama-imatrix not built: `make llamacpp-tools`; importance-matrix rows left out)", flush=True)
    embed = embedding_type(files["llama.cpp Q4_0"]["path"])
    ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data(args.calib, "calib"), progress=False)
    for name, steps in ours(args.samples, args.seq_len).items():
        if args.variants and not any(v in name for v in args.variants):
            continue
        model = copy.deepcopy(bundle.model)
        start = time.perf_counter()
        apply_steps(model, steps, ctx)
        compress_s = round(time.perf_counter() - start, 2)
        path = work / f"ours-{len(files)}.gguf"
        info = export_gguf(model, bundle.tokenizer, path, unquantized=embed)
        files[name] = {"path": path, "made_by": f"slimformer {steps}", "compress_s": compress_s,
                       "write_s": info["seconds"], "tensors": info["tensors"]}
        print(f"  {name:32s} compressed in {compress_s:7.1f} s, written in {info['seconds']:.1f} s", flush=True)
        del model
    return files


def onnx_file(bundle: Any, work: Path) -> Path:
    """Our best ONNX 4-bit decoder: RTN g32 symmetric, MatMulNBits with int8 compute, key/value cache."""
    model = copy.deepcopy(bundle.model)
    apply_steps(model, "{method: rtn, bits: 4, group_size: 32, symmetric: true}", None)
    path = work / "rtn4-g32.onnx"
    export_onnx(model, "decoder", path, kv_cache=True, int4_compute="int8")
    return path


def time_round(files: dict[str, dict[str, Any]], bundle: Any, onnx: Path, timing: BenchSettings,
               reverse: bool) -> dict[str, Any]:
    """One timing of everything: {name: {"prefill_ms", "decode_ms"}}. The order is reversed on every
    other round (`reverse`), so that a drift in the machine's speed over a round (measured here: the
    later files of a round slower by up to 30%) does not favour the files timed first."""
    vocab = int(bundle.model.config.vocab_size)
    jobs: list[tuple[str, Any]] = [("torch fp32", lambda: bench_torch_decoding_threads(bundle.model, vocab, timing)),
                                   ("ONNX RTN 4-bit g32 (int8 compute)", lambda: bench_ort_decoding(
                                       OrtModel(onnx, "decoder", threads=timing.threads), vocab, timing))]
    for name, f in files.items():
        jobs.append((name, lambda path=f["path"]: _time_gguf(path, timing)))
    out = {}
    with torch.inference_mode():
        for name, job in reversed(jobs) if reverse else jobs:
            out[name] = job()
    return {k: {"prefill_ms": v["prefill"]["median_ms"], "decode_ms": v["decode"]["median_ms"]} for k, v in out.items()}


def _time_gguf(path: Path, timing: BenchSettings) -> dict[str, Any]:
    with GgufModel(path, threads=timing.threads, n_ctx=8) as m:
        return m.time_decoding(timing.prefill, timing.runs, timing.warmup)


def paired_ratio(rounds: list[dict[str, Any]], name: str, reference: str, key: str = "decode_ms") -> float | None:
    """Median over rounds of (name's time / reference's time in the same round): a pairwise ratio, so
    that the machine's round-to-round drift (which moves both) cancels."""
    pairs = [one[name][key] / one[reference][key] for one in rounds if name in one and reference in one]
    return round(statistics.median(pairs), 3) if pairs else None


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = load_bundle(args.model)
    windows = lm_windows(bundle.tokenizer, load_data(args.eval, "eval").joined(), 512, args.max_windows)
    files = make_files(args, bundle, work)
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        rows["torch fp32"] = {"ppl": perplexity(bundle.model, windows, progress=False)["ppl"],
                              "size_bytes": sum(p.stat().st_size for p in bundle.folder.glob("*.safetensors"))}
    onnx = onnx_file(bundle, work)
    rows["ONNX RTN 4-bit g32 (int8 compute)"] = {"size_bytes": onnx.stat().st_size}
    for name, f in files.items():
        with GgufModel(f["path"], threads=args.threads, n_ctx=windows.shape[1]) as m:
            ppl = m.perplexity(windows, progress=False)["ppl"]
        rows[name] = {"ppl": ppl, "size_bytes": f["path"].stat().st_size,
                      **{k: v for k, v in f.items() if k != "path"}}
        print(f"  {name:32s} ppl {ppl:7.3f}  {rows[name]['size_bytes'] / 1e6:6.1f} MB", flush=True)
    timing = BenchSettings(runtime="onnxruntime", runs=args.runs, warmup=args.warmup, prefill=args.prefill,
                           threads=args.threads)
    load = wait_quiet(args.quiet_load, args.quiet_wait) if args.rounds else None
    # --timed: a subset of the GGUF files (torch fp32 and ONNX are always timed); every file's prefill
    # is timed runs + warmup times per round, so timing all of them takes ~13 minutes a round here
    timed = {k: v for k, v in files.items() if not args.timed or any(t in k for t in args.timed)}
    rounds = []
    for r in range(args.rounds):
        rounds.append(time_round(timed, bundle, onnx, timing, reverse=r % 2 == 1))
        print(f"  timing round {r + 1}/{args.rounds} done", flush=True)
    for name in rounds[0] if rounds else ():
        for key in ("prefill_ms", "decode_ms"):
            values = [one[name][key] for one in rounds]
            rows[name][key] = round(statistics.median(values), 3)
            rows[name][key + "_rounds"] = values
    return {"model": args.model, "eval": args.eval, "windows": int(windows.shape[0]), "threads": args.threads,
            "prefill": args.prefill, "rounds": args.rounds, "calibration": f"{args.samples} x {args.seq_len}",
            "load_before_timing": load, "load_after_timing": round(os.getloadavg()[0], 2),
            "rows": rows, "goals": goals(rows, rounds), "environment": environment()}


def wait_quiet(limit: float, patience_s: float) -> float:
    """Wait (up to `patience_s`) until the 1-minute load average is below `limit`: llama.cpp's
    spinning threads make timings beside another job meaningless. Returns the load when timing starts."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine (load {os.getloadavg()[0]:.2f})", flush=True)
        time.sleep(30)
    return round(os.getloadavg()[0], 2)


def goals(rows: dict[str, dict[str, Any]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, for each of our calibrated Q4_0 files (GPTQ, AWQ), on this run's rows:
    perplexity below llama.cpp's own Q4_0 and Q4_K_M (with and without its importance matrix; Q4_K_M
    at a smaller file), decode against llama.cpp's Q4_0, our ONNX 4-bit and torch fp32 (each the median
    of the per-round ratios, `paired_ratio`), and the share of the compression time spent writing the
    file. None where a row is missing."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    out: dict[str, Any] = {}
    for name, row in rows.items():
        if not name.startswith(("GPTQ", "AWQ")) or "Q4_0" not in name or "ppl" not in row:
            continue
        one: dict[str, Any] = {}
        for theirs in ("llama.cpp Q4_0", "llama.cpp Q4_0 + imatrix", "llama.cpp Q4_K_M", "llama.cpp Q4_K_M + imatrix"):
            if theirs in rows:
                smaller = row["size_bytes"] < rows[theirs]["size_bytes"] or "Q4_0" in theirs
                one[f"below {theirs}"] = row["ppl"] < rows[theirs]["ppl"] and smaller
        one["decode / llama.cpp Q4_0"] = paired_ratio(rounds, name, "llama.cpp Q4_0")
        one["decode / llama.cpp Q4_0 + imatrix"] = paired_ratio(rounds, name, "llama.cpp Q4_0 + imatrix")
        onnx = paired_ratio(rounds, name, "ONNX RTN 4-bit g32 (int8 compute)")
        fp32 = paired_ratio(rounds, name, "torch fp32")
        one["ONNX 4-bit decode / ours"] = None if onnx is None else round(1 / onnx, 3)
        one["torch fp32 decode / ours"] = None if fp32 is None else round(1 / fp32, 3)
        one["write / compression time"] = ratio(row.get("write_s"), row.get("compress_s"))
        out[name] = one
    return out


def table(report: dict[str, Any]) -> str:
    lines = [f"| file | size (MB) | ppl ({report['windows']} windows, llama.cpp logits) | prefill 1×{report['prefill']} "
             "(ms) | decode (ms/token) | made in (s) |", "|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "—"
        made = f"{r['compress_s']:.1f}" + (f" + write {r['write_s']:.1f}" if "write_s" in r else "") if "compress_s" in r else "—"
        prefill = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "—"  # "—": not timed (--timed)
        decode = f"{r['decode_ms']:.2f}" if "decode_ms" in r else "—"
        lines.append(f"| {name} | {r['size_bytes'] / 1e6:.1f} | {ppl} | {prefill} | {decode} | {made} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("out/llamacpp.json"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval", default="lee-news")
    parser.add_argument("--calib", default="lee-news")
    parser.add_argument("--max-windows", type=int, default=16, help="perplexity windows (the issue's goals use 16)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (GPTQ/AWQ/SparseGPT, imatrix)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--runs", type=int, default=16, help="timed decode steps per round (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (0: perplexity and sizes only)")
    parser.add_argument("--quiet-load", type=float, default=0.6, help="wait for a load average below this to time")
    parser.add_argument("--quiet-wait", type=float, default=3600, help="seconds to wait for it at most")
    parser.add_argument("--variants", nargs="*", help="our variants to run (substrings of their names; default all)")
    parser.add_argument("--timed", nargs="*", help="GGUF files to time (substrings of their names; default all)")
    parser.add_argument("--tools", type=Path, default=ROOT / ".venv" / "llama.cpp", help="`make llamacpp-tools` output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(json.dumps(report["goals"], indent=2))


if __name__ == "__main__":
    main()
