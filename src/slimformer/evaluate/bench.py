"""`slimformer bench`: latency and throughput of models in PyTorch or onnxruntime, side by side.

For every model: one forward pass of batch x seq tokens (median, min, max over `runs` timed runs
after `warmup`, tokens/s at the median). Decoders also get
- prefill: 1 x `prefill` tokens, building the key/value cache (what the first step of generation does);
- decode: one token at a time with the cache after a `prefill`-token context; per-token median.
PyTorch decodes through `past_key_values` (a DynamicCache); onnxruntime through an export with
past/present key/value tensors (`export_onnx(..., kv_cache=True)`), so both are real incremental decoding.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.models.placement import check_runs_on, model_dtype, resolve_device, resolve_dtype
from slimformer.evaluate.latency import time_calls, torch_threads

RUNTIMES = ("torch", "onnxruntime")
ENCODER_IDS = 1000  # random ids for a bare encoder .onnx file (its vocabulary is unknown; any valid id times the same)


@dataclass(frozen=True)
class BenchSettings:
    """What to time: forward shape, threads, repetitions, and the decoder prefill/decode context."""

    runtime: str = "torch"
    batch: int = 1
    seq: int = 128
    threads: int | None = None
    runs: int = 20
    warmup: int = 3
    prefill: int = 512  # decoders: prefill length and the decode context; 0 skips both
    device: str = "auto"  # torch runtime: where the model runs (auto: a GPU when torch sees one)
    dtype: str = "auto"  # torch runtime: the dtype a Hugging Face folder loads in (onnxruntime: float32)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}.")
        for name in ("batch", "seq", "runs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {self.threads}.")
        if self.warmup < 0 or self.prefill < 0:
            raise UserError(f"--warmup and --prefill must be >= 0, got {self.warmup} and {self.prefill}.")
        resolve_device(self.device)  # an unknown device or a missing GPU fails before any model is read
        resolve_dtype(self.dtype)


def latency_stats(times_ms: list[float], tokens: int) -> dict[str, float]:
    """Median, min, max of `times_ms` and tokens per second at the median (`tokens` per call)."""
    median = statistics.median(times_ms)
    return {"median_ms": round(median, 3), "min_ms": round(min(times_ms), 3), "max_ms": round(max(times_ms), 3),
            "tokens_per_s": round(tokens / (median / 1e3), 2), "runs": len(times_ms)}


@dataclass
class Target:
    """A model ready to time: a torch module or an onnxruntime session (`OrtModel`)."""

    name: str
    runtime: str
    kind: str
    model: nn.Module
    vocab: int
    size_bytes: int | None = None


def _ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def bench_forward(target: Target, s: BenchSettings) -> dict[str, float]:
    """One forward pass of s.batch x s.seq tokens (no cache)."""
    ids = _ids(target.vocab, s.batch, s.seq)
    if target.runtime == "torch":
        ids = ids.to(next(target.model.parameters()).device)
    mask = torch.ones_like(ids)
    kwargs = {"use_cache": False} if target.runtime == "torch" and target.kind == "decoder" else {}
    return latency_stats(time_calls(lambda: target.model(input_ids=ids, attention_mask=mask, **kwargs),
                                    s.runs, s.warmup), s.batch * s.seq)


def bench_torch_decoding(model: nn.Module, vocab: int, s: BenchSettings) -> dict[str, Any]:
    """Prefill 1 x s.prefill tokens into a DynamicCache; then one-token steps on that cache."""
    device = next(model.parameters()).device
    ids = _ids(vocab, 1, s.prefill).to(device)
    prefill = latency_stats(time_calls(lambda: model(input_ids=ids, use_cache=True), s.runs, s.warmup), s.prefill)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    steps = _ids(vocab, 1, s.warmup + s.runs, seed=1).to(device)
    position = iter(range(s.warmup + s.runs))
    decode = latency_stats(time_calls(
        lambda: model(input_ids=steps[:, next(position)].view(1, 1), past_key_values=cache, use_cache=True),
        s.runs, s.warmup), 1)
    return {"prefill": prefill, "decode": {**decode, "context": s.prefill}}


def bench_ort_decoding(model: Any, vocab: int, s: BenchSettings) -> dict[str, Any]:
    """The same through a kv_cache ONNX export: prefill with an empty past, then one-token steps
    feeding each step's present keys/values back as the next step's past."""
    ids = _ids(vocab, 1, s.prefill)
    mask = torch.ones_like(ids)
    prefill = latency_stats(time_calls(lambda: model.step(ids, mask, model.empty_past(1)), s.runs, s.warmup),
                            s.prefill)
    _, past = model.step(ids, mask, model.empty_past(1))
    steps = _ids(vocab, 1, s.warmup + s.runs, seed=1)
    state = {"past": past, "t": 0}

    def one_token() -> None:
        t = state["t"]
        step_mask = torch.ones(1, s.prefill + t + 1, dtype=torch.long)
        _, state["past"] = model.step(steps[:, t].view(1, 1), step_mask, state["past"])
        state["t"] = t + 1

    decode = latency_stats(time_calls(one_token, s.runs, s.warmup), 1)
    return {"prefill": prefill, "decode": {**decode, "context": s.prefill}}


@torch.inference_mode()
def bench_target(target: Target, s: BenchSettings) -> dict[str, Any]:
    """Every measurement for one model, with torch's thread count set for the call and restored."""
    with torch_threads(s.threads) as threads:
        result: dict[str, Any] = {"model": target.name, "runtime": target.runtime, "kind": target.kind,
                                  "size_bytes": target.size_bytes, "forward": bench_forward(target, s)}
        if target.kind == "decoder" and s.prefill:
            if target.runtime == "torch":
                result.update(bench_torch_decoding(target.model, target.vocab, s))
            elif target.model.has_kv_cache:
                result.update(bench_ort_decoding(target.model, target.vocab, s))
            else:
                result["decode_note"] = "this ONNX file has no key/value cache inputs: re-export with kv_cache"
    result["threads"] = threads
    return result


def open_target(spec: str, s: BenchSettings, workdir: Path, index: int = 0) -> Target:
    """A model to time from an alias, a Hugging Face or slimformer folder (torch, or exported into
    `workdir` for onnxruntime) or an .onnx file (always onnxruntime, whatever `s.runtime` says:
    torch cannot run it, and the result's `runtime` names the one that did)."""
    from slimformer.evaluate.size import folder_bytes
    from slimformer.export.onnx import OrtModel, export_onnx
    from slimformer.models.loading import load_bundle

    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"ONNX file '{spec}' does not exist.")
        model = OrtModel(path, threads=s.threads)
        vocab = model.session.get_outputs()[0].shape[-1] if model.kind == "decoder" else ENCODER_IDS
        if not isinstance(vocab, int):
            raise UserError(f"'{spec}': the logits' vocabulary axis is not fixed in the file; re-export it.")
        return Target(spec, "onnxruntime", model.kind, model, vocab, path.stat().st_size)
    bundle = load_bundle(spec, tokenizer=False, dtype=s.dtype if s.runtime == "torch" else "float32")
    vocab = int(bundle.model.config.vocab_size)
    size = folder_bytes(bundle.folder) if bundle.folder is not None else None
    if s.runtime == "torch":
        device = resolve_device(s.device)
        check_runs_on(model_dtype(bundle.model), device)
        return Target(spec, "torch", bundle.kind, bundle.model.to(device), vocab, size)
    onnx_path = workdir / f"model{index}.onnx"
    info = export_onnx(bundle.model, bundle.kind, onnx_path, kv_cache=bundle.kind == "decoder")
    return Target(spec, "onnxruntime", bundle.kind, OrtModel(onnx_path, bundle.kind, threads=s.threads), vocab,
                  info["bytes"])


def bench(specs: list[str], settings: BenchSettings, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every model in `specs`, one after the other, with the same settings.

    Returns {"settings", "results": [per model: forward, prefill, decode, size_bytes, ...]}."""
    if not specs:
        raise UserError("bench needs at least one model (alias, folder or .onnx file).")
    results = []
    with tempfile.TemporaryDirectory(prefix="slimformer-bench-") as tmp:  # exported ONNX files go with it
        for index, spec in enumerate(specs):
            if str(spec).endswith(".gguf"):  # llama.cpp times its own file
                from slimformer.evaluate.llamacpp import bench_gguf

                results.append(bench_gguf(spec, settings))
            else:
                target = open_target(spec, settings, Path(tmp), index)
                results.append(bench_target(target, settings))
                del target
            if progress:
                progress(one_line(results[-1]))
    return {"settings": asdict(settings), "results": results}


def one_line(r: dict[str, Any]) -> str:
    """A short summary of one result."""
    f = r["forward"]
    text = f"{r['model']} ({r['runtime']}): forward {f['median_ms']:.1f} ms ({f['tokens_per_s']:.0f} tokens/s)"
    if "decode" in r:
        text += f", prefill {r['prefill']['median_ms']:.1f} ms, decode {r['decode']['median_ms']:.2f} ms/token"
    return text


# (label, section, key, format): the comparison table's rows
_ROWS = [
    ("forward median (ms)", "forward", "median_ms", "{:.2f}"),
    ("forward min / max (ms)", "forward", None, None),
    ("forward tokens/s", "forward", "tokens_per_s", "{:.0f}"),
    ("prefill median (ms)", "prefill", "median_ms", "{:.2f}"),
    ("decode median (ms/token)", "decode", "median_ms", "{:.3f}"),
    ("decode tokens/s", "decode", "tokens_per_s", "{:.1f}"),
]


def compare_table(report: dict[str, Any], *, ratios: bool = True) -> str:
    """Markdown table, one column per model; with `ratios`, each value after the first column is
    followed by its ratio to the first model's (latency: > 1 means slower)."""
    results = report["results"]
    header = ["metric"] + [f"{r['model']} ({r['runtime']})" for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = results[0]
    for label, section, key, fmt in _ROWS:
        if all(section not in r for r in results):
            continue
        cells = [label]
        for r in results:
            part = r.get(section)
            if part is None:
                cells.append("—")
            elif key is None:
                cells.append(f"{part['min_ms']:.2f} / {part['max_ms']:.2f}")
            else:
                cell = fmt.format(part[key])
                base = first.get(section, {}).get(key)
                if ratios and r is not first and base:
                    cell += f" ({part[key] / base:.2f}×)"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("size_bytes") for r in results):
        cells = ["size (MB)"] + [f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "—" for r in results]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["settings"]
    decoding = (f"; prefill: 1 × {s['prefill']}; decode: one token per step after {s['prefill']} tokens"
                if any("decode" in r for r in results) else "")
    lines.append(f"\nforward: batch {s['batch']} × seq {s['seq']}{decoding}; {results[0]['threads']} threads; median of "
                 f"{s['runs']} runs after {s['warmup']} warm-up"
                 + ("; (×): ratio to the first column" if ratios and len(results) > 1 else ""))
    return "\n".join(lines)
