"""What every peer benchmark shares (benchmarks/peers.py, pruning.py, wanda_rounding.py): the fp32
model and windows (`prepare`), the common options, evaluation on one or several texts, our recipe
on a fresh copy (`run_ours`), the timer, the markdown table and the JSON file."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import calibration_windows, lm_windows
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.layout import select_linears
from slimformer.models.loading import load_bundle
from slimformer.outputs import write_text_atomic
from slimformer.recipe import Recipe



SEQ_LEN = 512


@dataclass
class Bench:
    """What every variant shares: the fp32 model, the evaluation and calibration windows."""

    model: nn.Module
    tokenizer: Any
    eval_windows: torch.Tensor  # of the first --eval-texts text: the "ppl" of every row
    calib_windows: torch.Tensor
    ctx: StepContext
    targets: list[str]  # full names of the Linear layers inside the blocks (the default targets, docs/design.md)
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)  # lazily built shared inputs (ONNX export...)
    eval_text: str = "lee-news"
    more_evals: dict[str, torch.Tensor] = field(default_factory=dict)  # the other --eval-texts


def evaluate(model: Any, bench: Bench) -> dict[str, Any]:
    """{"ppl": on the first evaluation text} plus {"ppl_by_text": every text} when there are several."""
    ppl = perplexity(model, bench.eval_windows, progress=False)["ppl"]
    if not bench.more_evals:
        return {"ppl": ppl}
    by_text = {bench.eval_text: ppl}
    by_text.update({t: perplexity(model, w, progress=False)["ppl"] for t, w in bench.more_evals.items()})
    return {"ppl": ppl, "ppl_by_text": by_text}


class PeerError(Exception):
    """A peer that cannot run at this setting, with the reason as its message."""


# A peer compresses a fresh copy of the fp32 model and returns what is evaluated (a module whose
# output has `.logits`, or the path of an ONNX file) plus notes on what it actually did.
PeerFn = Callable[[nn.Module, Bench], tuple[Any, list[str]]]


@dataclass(frozen=True)
class Peer:
    library: str  # the --only name of the library
    label: str  # what the table shows
    run: PeerFn


@dataclass(frozen=True)
class Setting:
    key: str  # the --only name of the setting
    label: str
    ours: tuple[str, ...]  # recipe YAMLs applied in turn; {n} is the calibration window count
    peers: tuple[Peer, ...]


def smoke(model: Any, bench: Bench) -> None:
    """One short forward pass, so a layout without a CPU kernel fails here, timed with the peer."""
    with torch.inference_mode():
        model(input_ids=bench.eval_windows[:1, :8], use_cache=False)


def selected(only: list[str] | None, settings: tuple, libraries: Any) -> list[tuple[Setting, list[Peer]]]:
    """Settings and peers named by --only (setting keys and/or library names; none named: all).
    A setting with no peer is kept unless a library was named (benchmarks/pruning.py has ours-only rows)."""
    libraries = sorted(libraries)
    names = set(only or ())
    keys = {s.key for s in settings}
    unknown = names - keys - set(libraries)
    if unknown:
        raise SystemExit(f"--only: unknown name(s) {sorted(unknown)}; settings: {sorted(keys)}; libraries: {libraries}")
    want_settings, want_libs = names & keys, names - keys
    plan = []
    for s in settings:
        if want_settings and s.key not in want_settings:
            continue
        peers = [p for p in s.peers if not want_libs or p.library in want_libs]
        if peers or not want_libs:
            plan.append((s, peers))
    return plan


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_ours(setting: Setting, bench: Bench) -> dict[str, Any]:
    """Our recipe on a fresh copy: ppl and compression seconds."""
    model = copy.deepcopy(bench.model)
    n = str(bench.calib_windows.shape[0])
    recipes = [Recipe.from_yaml(text.replace("{n}", n)) for text in setting.ours]

    def compress() -> None:
        for recipe in recipes:
            recipe.apply(model, bench.ctx)

    _, seconds = timed(compress)
    return {**evaluate(model, bench), "compress_s": round(seconds, 1)}


def prepare(args: argparse.Namespace, workdir: Path) -> Bench:
    """The fp32 model and the windows named by --model, --calib-text, --eval-texts."""
    bundle = load_bundle(args.model)
    calib = load_data(args.calib_text, "calib")
    first, *others = args.eval_texts

    def windows(text: str, cap: int | None) -> torch.Tensor:
        return lm_windows(bundle.tokenizer, load_data(text, "eval").joined(), SEQ_LEN, cap)

    return Bench(
        model=bundle.model, tokenizer=bundle.tokenizer, eval_windows=windows(first, args.max_windows),
        calib_windows=calibration_windows(bundle.tokenizer, calib, args.calib_windows, SEQ_LEN),
        ctx=StepContext(tokenizer=bundle.tokenizer, calib=calib, progress=False),
        targets=list(select_linears(bundle.model, None)), workdir=workdir,
        eval_text=first, more_evals={t: windows(t, args.max_windows_other or args.max_windows) for t in others},
    )


def ppl_line(result: dict[str, Any]) -> str:
    """'ppl 23.54' or, evaluated on several texts, 'ppl lee-news 23.54, shakespeare 61.95' (the
    progress lines carry every text, so a run stopped early still says what it measured)."""
    if "ppl_by_text" not in result:
        return f"ppl {result['ppl']:.2f}"
    return "ppl " + ", ".join(f"{t} {p:.2f}" for t, p in result["ppl_by_text"].items())


def on_text(result: dict[str, Any], text: str | None) -> dict[str, Any]:
    """`result` with "ppl" taken on evaluation text `text` (None: the first text)."""
    if text is None or "ppl" not in result:
        return result
    return {**result, "ppl": result["ppl_by_text"][text]}


def table(rows: list[dict[str, Any]], text: str | None = None) -> str:
    """Markdown: one row per (setting, peer); ratios peer / ours; notes listed below.
    text: which evaluation text's perplexity (None: the first)."""
    lines = ["| setting | ours ppl | peer | peer ppl | ppl ratio | ours s | peer s | time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        r = on_text(r, text)
        ours = on_text(r["ours"], text)
        if "ppl" in r:
            cells = [f"{r['ppl']:.2f}", f"{r['ppl'] / ours['ppl']:.3f}", f"{ours['compress_s']}", f"{r['compress_s']}",
                     f"{r['compress_s'] / max(ours['compress_s'], 0.1):.2f}"]
            notes += [f"- {r['peer']} ({r['setting']}): " + "; ".join(r["notes"])] if r.get("notes") else []
        else:
            cells = [f"cannot run: {one_line(r['error'])}", "—", f"{ours['compress_s']}", "—", "—"]
        lines.append(f"| {r['setting']} | {ours['ppl']:.2f} | {r['peer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def one_line(text: str, limit: int = 300) -> str:
    """Table cells hold one line: newlines and pipes out, long messages cut (full text in the JSON)."""
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def run_benchmark(args: argparse.Namespace, plan: list, run_fn: Callable, prefix: str) -> None:
    """Prepare the model and windows, run `plan` through `run_fn`, print the table, write --json."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        bench = prepare(args, Path(tmp))
        evals = {bench.eval_text: bench.eval_windows, **bench.more_evals}
        fp32 = {"ppl": None} if args.no_baseline else evaluate(bench.model, bench)
        shown = ", ".join(f"{t} {_fmt(fp32.get('ppl_by_text', {t: fp32['ppl']})[t])} ({w.shape[0]} windows)"
                          for t, w in evals.items())
        print(f"{args.model}: fp32 ppl {shown}; calibration {bench.calib_windows.shape[0]} windows x {SEQ_LEN} "
              f"of {args.calib_text}; {torch.get_num_threads()} threads", flush=True)
        rows = run_fn(plan, bench)
    for text in evals:
        print(f"\n{text}:\n" + table(rows, text if bench.more_evals else None))
    out = Path(args.json)
    write_json(out, {"threads": torch.get_num_threads(), "max_windows": args.max_windows,
                               "max_windows_other": args.max_windows_other,
                               "model": args.model, "calib_text": args.calib_text,
                               "eval_windows": {t: int(w.shape[0]) for t, w in evals.items()},
                               "calib_windows": int(bench.calib_windows.shape[0]), "fp32_ppl": fp32["ppl"],
                               "fp32": fp32, "rows": rows})
    print(f"\nwrote {out}")


def _fmt(ppl: float | None) -> str:
    return "not measured (--no-baseline)" if ppl is None else f"{ppl:.2f}"


def write_json(path: str | Path, data: Any) -> None:
    """Every benchmark's result file: `data` as indented JSON at `path` (parents created), written
    through a temporary sibling and a rename, so a stopped run leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2))


def add_common_args(parser: argparse.ArgumentParser, json_default: str) -> None:
    """The options benchmarks/peers.py and benchmarks/pruning.py share."""
    parser.add_argument("--json", default=json_default)
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias or local Hugging Face folder")
    parser.add_argument("--calib-text", default="lee-news", help="text alias or folder the calibration windows come from")
    parser.add_argument("--eval-texts", nargs="+", default=["lee-news"], help="evaluation texts (first: the main one)")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N evaluation windows only")
    parser.add_argument("--max-windows-other", type=int,
                        help="the first N windows of the other --eval-texts (default: as --max-windows)")
    parser.add_argument("--calib-windows", type=int, default=64, help="calibration windows of 512 tokens (default 64)")
    parser.add_argument("--only", nargs="*", help="setting keys and/or library names to run")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the fp32 evaluation (a rerun of rows whose fp32 perplexity is known)")
