"""`evaluate.bench`: timing statistics, settings validation, and a tiny decoder in both runtimes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny import tiny_llama as make_tiny_llama  # tests/tiny.py

from slimformer.cli import main
from slimformer.errors import UserError
from slimformer.evaluate.bench import BenchSettings, bench, compare_table, latency_stats
from slimformer.evaluate.latency import time_calls
from slimformer.export.onnx import export_onnx


def test_latency_stats_exact() -> None:
    stats = latency_stats([4.0, 2.0, 10.0, 3.0, 5.0], tokens=64)
    assert stats == {"median_ms": 4.0, "min_ms": 2.0, "max_ms": 10.0, "tokens_per_s": 16000.0, "runs": 5}


def test_time_calls_skips_warmup() -> None:
    calls = []
    times = time_calls(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)


@pytest.mark.parametrize("bad", [{"batch": 0}, {"runs": 0}, {"seq": -1}, {"threads": 0}, {"warmup": -1},
                                 {"prefill": -2}, {"runtime": "tensorrt"}])
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(UserError):
        BenchSettings(**bad)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "llama"
    make_tiny_llama(hidden_size=32, intermediate_size=64, max_position_embeddings=2048).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_bench_decoder(tiny_llama, runtime: str) -> None:
    settings = BenchSettings(runtime=runtime, batch=2, seq=16, runs=3, warmup=1, prefill=8, threads=1)
    threads = torch.get_num_threads()
    report = bench([str(tiny_llama), str(tiny_llama)], settings)
    assert torch.get_num_threads() == threads  # restored
    first, second = report["results"]
    assert first["runtime"] == runtime and first["kind"] == "decoder" and first["threads"] == 1
    assert first["forward"]["runs"] == 3 and first["decode"]["runs"] == 3 and first["decode"]["context"] == 8
    f = first["forward"]
    assert f["min_ms"] <= f["median_ms"] <= f["max_ms"]
    # median_ms is rounded to 1 us, tokens_per_s comes from the unrounded median: bound both ways
    low, high = (32 / ((f["median_ms"] + d) / 1e3) for d in (0.0005, -0.0005))
    assert low - 0.01 <= f["tokens_per_s"] <= high + 0.01
    assert first["prefill"]["median_ms"] > 0 and second["size_bytes"] > 0
    table = compare_table(report)
    assert "decode median (ms/token)" in table and table.count("×)") == 6  # ratios in the second column


def test_onnx_file_runs_in_onnxruntime_without_the_flag(tiny_llama, tmp_path, capsys) -> None:
    onnx_file, summary = tmp_path / "llama.onnx", tmp_path / "bench.json"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    export_onnx(model, "decoder", onnx_file)
    assert main(["bench", str(onnx_file), "--runs", "2", "--warmup", "1", "--prefill", "0", "--seq", "8",
                 "--json", str(summary)]) == 0, capsys.readouterr().err  # the default --runtime is torch
    (result,) = json.loads(summary.read_text())["results"]
    assert result["runtime"] == "onnxruntime" and result["forward"]["runs"] == 2
    assert "(onnxruntime)" in capsys.readouterr().out
