"""Where our GPTQ's compression time goes, measured phase by phase, against the floor of two
calibration forward passes per block (one to observe the original block, one to run the quantized
block for the next block's inputs) and, with --peer, llm-compressor's GPTQModifier in the same run.

    .venv/bin/python benchmarks/gptq_time.py --model gemma3-270m --calib-windows 64 --bits 4 --group-size 128 \
        [--peer] [--json out/gptq-time.json]

The phases are timed by wrapping the library's own functions for the length of the run (nothing in
src/ is changed): `capture_first_block_inputs` (embeddings), `accumulate_hessian` (x^T x per
distinct layer input), `observe_linears` (the observing forward pass, hooks included),
`inverse_hessian_factor` (the inverse factor, fp64), `gptq_quantize` (the column walk), `QuantLinear.from_codes` (packing) and `BlockInputs.run` (every block forward). Times
are inclusive; the table subtracts the nested ones. "forward passes" is each phase's time over one
plain forward pass of all blocks on the calibration windows, measured before the run.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
os.environ.setdefault("TQDM_DISABLE", "1")

import harness  # benchmarks/harness.py
import torch
from torch import nn

import slimformer.calibrate.collectors as collectors
import slimformer.calibrate.engine as engine
import slimformer.quant.gptq as gptq_module
import slimformer.quant.gptq_math as gptq_math
from slimformer.models.layout import find_blocks
from slimformer.quant.qlinear import QuantLinear
from slimformer.recipe import Recipe


class PhaseTimer:
    """Inclusive wall time and call count per wrapped function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed

    @contextmanager
    def patched(self) -> Iterator[None]:
        """The library's phase functions wrapped, where their callers look them up."""
        targets = [
            (engine, "capture_first_block_inputs", "capture"),
            (collectors, "accumulate_hessian", "hessian"),
            (gptq_module, "observe_linears", "observe"),
            (gptq_math, "inverse_hessian_factor", "inverse"),
            (gptq_module, "gptq_quantize", "gptq_quantize"),
            (engine.BlockInputs, "run", "block_forward"),
        ]
        with ExitStack() as stack:
            for owner, attr, name in targets:
                stack.enter_context(mock.patch.object(owner, attr, self.wrap(name, getattr(owner, attr))))
            from_codes = QuantLinear.from_codes.__func__
            stack.enter_context(mock.patch.object(
                QuantLinear, "from_codes", classmethod(self.wrap("pack", from_codes))))
            yield


def one_forward_pass(model: nn.Module, windows: torch.Tensor) -> float:
    """Seconds of one plain forward pass of every block on the calibration windows (batches of 8, as
    the engine runs them), the unit of the table."""
    inputs = engine.capture_first_block_inputs(model, windows)
    _, blocks = find_blocks(model)
    start = time.perf_counter()
    for block in blocks:
        inputs = inputs.advance(inputs.run(block))
    return time.perf_counter() - start


def breakdown(t: PhaseTimer, total: float) -> list[tuple[str, float]]:
    """Exclusive seconds per phase: the Hessian is accumulated inside the observing pass; the
    inverse factor is made outside `gptq_quantize` (once per shared Hessian, `gptq_factor`)."""
    s = t.seconds
    propagate = s["block_forward"]  # observe_linears calls the block itself, not BlockInputs.run
    timed_phases = s["capture"] + s["observe"] + s["inverse"] + s["gptq_quantize"] + s["pack"] + propagate
    return [
        ("embeddings (record every block's call arguments)", s["capture"]),
        ("observing forward pass (hooks, upcast, finite check)", s["observe"] - s["hessian"]),
        ("Hessian accumulation (x^T x)", s["hessian"]),
        ("inverse Hessian factor (fp64 Cholesky)", s["inverse"]),
        ("GPTQ column walk", s["gptq_quantize"]),
        ("packing codes into QuantLinear", s["pack"]),
        ("forward pass of the quantized block", propagate),
        ("the rest (onloading, host memory, bookkeeping)", total - timed_phases),
    ]


def run_peer(bench: harness.Bench, bits: int, group: int) -> float:
    from peer_llmcompressor import _calib_dataset, llmc_gptq

    import llmcompressor  # noqa: F401  (imported before the timer, as benchmarks/peers.py does)
    _calib_dataset(bench)
    model = copy.deepcopy(bench.model)
    _, seconds = harness.timed(lambda: llmc_gptq(group, bits=bits)(model, bench))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-text", default="lee-news")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--peer", action="store_true", help="time llm-compressor's GPTQModifier in the same run")
    parser.add_argument("--json", default="out/gptq-time.json")
    args = parser.parse_args()
    args.eval_texts, args.max_windows, args.max_windows_other = ["lee-news"], 1, 1
    with tempfile.TemporaryDirectory(prefix="slimformer-gptq-time-") as tmp:
        bench = harness.prepare(args, Path(tmp))
        windows = bench.calib_windows
        unit = one_forward_pass(bench.model, windows)
        recipe = Recipe.from_yaml(f"steps: [{{method: gptq, bits: {args.bits}, group_size: {args.group_size}, "
                                  f"symmetric: false, num_samples: {windows.shape[0]}}}]")
        model, timer = copy.deepcopy(bench.model), PhaseTimer()
        with timer.patched():
            _, total = harness.timed(lambda: recipe.apply(model, bench.ctx))
        peer = run_peer(bench, args.bits, args.group_size) if args.peer else None
    rows = breakdown(timer, total)
    print(f"{args.model}, GPTQ W{args.bits} g{args.group_size}, {windows.shape[0]} x {windows.shape[1]} calibration, "
          f"{torch.get_num_threads()} threads; one forward pass of all blocks: {unit:.1f} s\n")
    print("| phase | s | share | forward passes |\n|---|---|---|---|")
    for name, seconds in rows + [("total", total)]:
        print(f"| {name} | {seconds:.1f} | {seconds / total:.1%} | {seconds / unit:.2f} |")
    if peer is not None:
        print(f"| llm-compressor GPTQModifier, total | {peer:.1f} | {peer / total:.2f}× ours | {peer / unit:.2f} |")
    harness.write_json(args.json, {
        "model": args.model, "bits": args.bits, "group_size": args.group_size, "calib_windows": int(windows.shape[0]),
        "threads": torch.get_num_threads(), "one_forward_pass_s": unit, "total_s": total, "peer_s": peer,
        "phases": {name: seconds for name, seconds in rows}, "inclusive": dict(timer.seconds), "calls": dict(timer.calls),
    })
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
