"""Scale: GPTQ W4 g128 on decoders of growing size, loaded in their stored bf16 and calibrated one
block at a time: wall time per block, peak RSS, bytes read, against the fp32 whole-model path and
llm-compressor's sequential pipeline (issue 17; numbers in docs/scale.md).

    python benchmarks/scale.py [--models smollm2-135m smollm2-360m ...] [--calib-windows 4]
        [--group-size 128] [--fp32 MODEL ...] [--peer MODEL ...] [--json out/scale.json]
    python benchmarks/scale.py --merge out/a.json out/b.json --json out/scale.json

SmolLM2-135M is the real checkpoint (cast to bf16); the others are built from their published
configs with random weights (`slimformer.models.synthetic`), written once as bf16 safetensors to
--workdir. Each run is its own process, so its peak RSS is its own. Perplexity is not measured
(random weights); the time and memory of the method are what scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02}
SMOLLM = {**LLAMA, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0}
LLAMA3 = {**LLAMA, "vocab_size": 128256, "rope_theta": 500000.0, "num_key_value_heads": 8, "head_dim": 128}
# the published configs' shapes (HuggingFaceTB/SmolLM2-*, meta-llama/Llama-3.2-3B, Llama-3.1-8B)
CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-360m": {**SMOLLM, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64},
    "smollm2-1.7b": {**SMOLLM, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "rope_theta": 130000.0},
    "llama3-3b": {**LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                  "num_attention_heads": 24, "tie_word_embeddings": True},
    "llama3-8b": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "tie_word_embeddings": False},
}
RECIPE = "steps: [{{method: gptq, bits: 4, group_size: {g}, num_samples: {n}}}]"
RECIPE_FIRST = "steps: [{{method: gptq, bits: 4, group_size: {g}, num_samples: {n}, targets: ['re:^model\\.layers\\.({blocks})\\.']}}]"


def model_folder(name: str, workdir: Path, layers: int | None = None) -> Path:
    """The bf16 folder for `name`, written once; with `layers`, the config cut to that many blocks
    (a block's peak and time are its shape's: a 2-block 8B-shaped model shows the 8B's per-block
    transient without the whole model)."""
    from slimformer.models.loading import resolve_folder

    folder = workdir / (name if layers is None else f"{name}-L{layers}")
    if (folder / "config.json").exists():
        return folder
    tokenizer = resolve_folder("smollm2-135m")  # SmolLM2's tokenizer also stands in for Llama 3's (ids < 49152)
    tmp = workdir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "smollm2-135m":
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tokenizer, dtype=torch.bfloat16, local_files_only=True,
                                             trust_remote_code=False).save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / f, tmp / f)
    else:
        from slimformer.models.synthetic import write_random_decoder

        config = CONFIGS[name] if layers is None else {**CONFIGS[name], "num_hidden_layers": layers}
        write_random_decoder(config, tmp, tokenizer_from=tokenizer)
    tmp.rename(folder)
    return folder


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PhaseTrace:
    """The peak resident set of each phase of a run, sampled every 20 ms by a thread: the load, the
    capture of the first block's inputs, and each block's turn (its forwards and the method's work
    on it), so a peak can be put down to where it happens. Phases are switched by wrapping the
    engine's `capture_first_block_inputs` and `onloaded` (ours only; the peer's run is one phase)."""

    def __init__(self) -> None:
        import threading

        self.phase, self.peaks = "load", {"load": _rss_bytes()}
        self.seconds: dict[str, float] = {}  # wall time spent in each phase
        self._since = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = _rss_bytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def enter(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), _rss_bytes())
        now = time.perf_counter()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._since
        self.phase, self._since = phase, now

    def hook_engine(self, blocks: list[Any]) -> None:
        from contextlib import contextmanager

        from slimformer.calibrate import engine

        capture, onloaded = engine.capture_first_block_inputs, engine.onloaded
        index = {id(b): i for i, b in enumerate(blocks)}

        def traced_capture(*args: Any, **kwargs: Any) -> Any:
            self.enter("capture")
            return capture(*args, **kwargs)

        @contextmanager
        def traced_onloaded(block: Any, *args: Any, **kwargs: Any) -> Any:
            self.enter(f"block {index.get(id(block), '?')}")
            with onloaded(block, *args, **kwargs):
                yield

        engine.capture_first_block_inputs, engine.onloaded = traced_capture, traced_onloaded
        self._hook_gptq()

    def _hook_gptq(self) -> None:
        """Sub-phases inside a block: GPTQ's observation pass, each factor and each layer's sweep."""
        from slimformer.quant import gptq

        observe, factor, sweep = gptq.observe_linears, gptq.gptq_factor, gptq.gptq_quantize

        def within(label: str, fn: Any) -> Any:
            def traced(*args: Any, **kwargs: Any) -> Any:
                block = self.phase.split(" / ")[0]
                self.enter(f"{block} / {label} {tuple(args[0].shape)}" if label != "observe" else f"{block} / observe")
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.enter(block)
            return traced

        gptq.observe_linears, gptq.gptq_factor, gptq.gptq_quantize = (
            within("observe", observe), within("factor", factor), within("sweep", sweep))

    def stop(self) -> dict[str, int]:
        self.enter("end")
        self._stop.set()
        self._thread.join()
        # per block only the block's own peak and, for the first block, its sub-phases
        return {k: round(v / 1e6) for k, v in self.peaks.items() if " / " not in k or k.startswith("block 0 /")}


def worker(folder: Path, side: str, dtype: str, n: int, group: int = 128, compress: int = 0) -> dict[str, Any]:
    """One run in this process: ours (`slimformer`) or llm-compressor's oneshot (`llm-compressor`).
    compress > 0: GPTQ on the first `compress` blocks only, the others only run (the whole model's
    weights resident, each block's transient measured on top of them, in a fraction of the time)."""
    import torch

    from slimformer.context import StepContext
    from slimformer.data.sources import load_data
    from slimformer.models.layout import find_blocks
    from slimformer.models.loading import load_bundle
    from slimformer.models.placement import peak_memory
    from slimformer.recipe import Recipe

    torch.manual_seed(0)
    trace = PhaseTrace()
    start = time.perf_counter()
    bundle = load_bundle(folder, dtype=dtype)
    loaded = time.perf_counter() - start
    trace.enter("setup")
    ctx = StepContext(tokenizer=bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    blocks = len(find_blocks(bundle.model)[1])
    block_params = sum(p.numel() for p in find_blocks(bundle.model)[1][0].parameters())
    params = sum(p.numel() for p in bundle.model.parameters())
    t0 = time.perf_counter()
    if side == "slimformer":
        trace.hook_engine(find_blocks(bundle.model)[1])
        recipe = RECIPE.format(n=n, g=group) if not compress else RECIPE_FIRST.format(
            n=n, g=group, blocks="|".join(str(i) for i in range(compress)))
        Recipe.coerce(recipe).apply(bundle.model, ctx)
    else:
        trace.enter("peer")
        from types import SimpleNamespace

        sys.path.insert(0, str(Path(__file__).parent))
        from peer_llmcompressor import llmc_gptq

        bench = SimpleNamespace(calib_windows=ctx.calibration_windows(n, 512, "gptq"), cache={})
        llmc_gptq(group)(bundle.model, bench)
    method_s = time.perf_counter() - t0
    io = _io()
    peaks = trace.stop()
    # with `compress`, the time per compressed block is its phase's own; the other blocks only ran
    per_block = (sum(t for k, t in trace.seconds.items() if k.split(" / ")[0] in {f"block {i}" for i in range(compress)})
                 / compress if compress else method_s / blocks)
    return {"side": side, "dtype": dtype, "group_size": group, "params": params, "blocks": blocks, "block_params": block_params,
            "calib_windows": n, **({"compressed_blocks": compress} if compress else {}), "load_s": round(loaded, 2),
            "method_s": round(method_s, 2), "s_per_block": round(per_block, 3),
            "read_bytes": io["read_bytes"], "rchar": io["rchar"], **peak_memory(),
            "peak_rss_mb_by_phase": peaks}


def run_one(folder: Path, side: str, dtype: str, n: int, group: int, compress: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", str(folder), side, dtype, str(n), str(group), str(compress)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"side": side, "dtype": dtype, "error": done.stderr.strip().splitlines()[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | side | dtype | group | params (M) | bf16 size (MB) | s / block | GPTQ work / block (T) | "
             "G mult-adds / s | method (s) | peak while loading (MB) | peak RSS (MB) | RSS / bf16 size | read (MB) |",
             "|---" * 14 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['side']} | {r['dtype']} |" + " |" * 10 + f" {r['error']} |")
            continue
        bf16 = r["params"] * 2
        loaded = r.get("peak_rss_mb_by_phase", {}).get("load", "")
        work = gptq_work(r["model"], 512 * r.get("calib_windows", 4))
        read = f"{r['read_bytes'] / 1e6:.0f}" if "read_bytes" in r else ""  # rows copied from an older table lack it
        lines.append(f"| {r['model']} | {r['side']} | {r['dtype']} | {r.get('group_size', 128)} | "
                     f"{r['params'] / 1e6:.0f} | {bf16 / 1e6:.0f} | {r['s_per_block']:.2f} | {work / 1e12:.2f} | "
                     f"{work / r['s_per_block'] / 1e9:.0f} | {r['method_s']:.0f} | "
                     f"{loaded} | {r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / bf16:.2f} | "
                     f"{read} |")
    return "\n".join(lines)


SHAPES = {**CONFIGS, "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                                       "num_key_value_heads": 3, "head_dim": 64}}


def _widths(model: str) -> tuple[int, int, int, int]:
    c = SHAPES[model]
    return c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], \
        c["intermediate_size"]


def gptq_work(model: str, tokens: int) -> float:
    """Multiply-adds of one Llama block's GPTQ turn on `tokens` calibration tokens: the column
    sweep's updates (out x in^2 per layer), the inverse factor of each distinct input (Cholesky,
    inverse, Cholesky: 4/3 in^3 as the in-place fp32 path does it; the fp64 path's triangular solve
    and explicit product do about twice that, not counted), its Hessian (tokens x in^2) and the two forward passes
    (observation and output: 2 x tokens x parameters). GPTQ's time grows with this, not with the
    parameters: the widest input enters cubed."""
    h, q, kv, inter = _widths(model)
    layers = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]  # (out, in)
    inputs = [h, q, h, inter]  # q/k/v share one, gate/up one
    params = sum(o * i for o, i in layers)
    return (sum(o * i * i for o, i in layers) + sum(4 / 3 * n ** 3 + tokens * n * n for n in inputs)
            + 2 * tokens * params)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("compressed_blocks")]  # a partial run's time is not a whole run's
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 4))
    sizes = sorted({r["params"] for r in rows})
    b.plot([x / 1e9 for x in sizes], [1.2 * 2 * x / 1e9 for x in sizes], "k--", lw=0.8, label="1.2 x bf16 weights")
    def series(r: dict[str, Any]) -> tuple[str, str, str]:  # runs of another date (merged rows) are their own line
        return r["side"], r["dtype"], r.get("date", "")

    for key, marker in zip(sorted({series(r) for r in rows if "error" not in r}), "osd^v<>"):
        side, dtype, date = key
        if date:
            dtype = f"{dtype}, {date}"
        pts = sorted(((r["params"] / 1e9, r) for r in rows if series(r) == key and "error" not in r),
                     key=lambda t: t[0])
        xs = [x for x, _ in pts]
        a.plot(xs, [r["s_per_block"] for _, r in pts], marker=marker, label=f"{side} {dtype}")
        b.plot(xs, [r["peak_rss_bytes"] / 1e9 for _, r in pts], marker=marker, label=f"{side} {dtype}")
        c.plot([gptq_work(r["model"], 512 * r.get("calib_windows", 4)) / 1e12 for _, r in pts],
               [r["s_per_block"] for _, r in pts], marker=marker, label=f"{side} {dtype}")
    a.set(xlabel="parameters (B)", ylabel="GPTQ s / block", title="time per block")
    c.set(xlabel="GPTQ work per block (10^12 multiply-adds)", ylabel="GPTQ s / block", title="time against GPTQ's work")
    b.set(xlabel="parameters (B)", ylabel="peak RSS (GB)", title="peak RSS")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4], *map(int, sys.argv[5:8]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-360m", "smollm2-1.7b"],
                        choices=["smollm2-135m", *CONFIGS])
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128,
                        help="64 for a peer run on SmolLM2-360M: llm-compressor refuses groups that do not divide 960")
    parser.add_argument("--fp32", nargs="*", default=[],
                        help="models to also run on the fp32 whole-model path (--dtype float32)")
    parser.add_argument("--peer", nargs="*", default=[], help="models to run llm-compressor's GPTQModifier on")
    parser.add_argument("--layers", type=int, help="cut each config to this many blocks (a shape's per-block peak)")
    parser.add_argument("--blocks", type=int, default=0,
                        help="GPTQ on the first N blocks only, the rest only run: the whole model resident, "
                             "its per-block peak measured on top of it (the 8B config in minutes, not hours)")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "slimformer" / "scale"))
    parser.add_argument("--json", default="out/scale.json")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="run nothing: one table and plot from the rows of earlier runs' JSON files")
    args = parser.parse_args()
    if args.merge:
        rows = [row for f in args.merge for row in json.loads(Path(f).read_text())["rows"]]
        print(table(rows))
        Path(args.json).write_text(json.dumps({"merged": args.merge, "rows": rows}, indent=2))
        plot(rows, Path(args.json).with_suffix(".png"))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        folder = model_folder(name, workdir, args.layers)
        plan = [("slimformer", "auto")] + ([("slimformer", "float32")] if name in args.fp32 else []) + \
            ([("llm-compressor", "auto")] if name in args.peer else [])
        for side, dtype in plan:
            row = {"model": name, "date": time.strftime("%Y-%m-%d"), **({"layers": args.layers} if args.layers else {}),
                   **run_one(folder, side, dtype, args.calib_windows, args.group_size, args.blocks if side == "slimformer" else 0)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n" + table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"calib_windows": args.calib_windows, "group_size": args.group_size, "rows": rows}
    out.write_text(json.dumps(summary, indent=2))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
