"""Per-token decode timing with a key/value cache, in torch and in an ONNX export with past/present."""

from __future__ import annotations

import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.evaluate.latency import measure_decode
from slimformer.export.onnx import OrtModel, export_onnx


def _tiny_llama() -> torch.nn.Module:
    return tiny_llama(vocab_size=256, hidden_size=32, intermediate_size=64, max_position_embeddings=256)


def test_decode_in_torch_and_onnxruntime(tmp_path) -> None:
    model = _tiny_llama()
    torch_result = measure_decode(model, 256, context=64, runs=4, warmup=1)
    assert torch_result["decode_context"] == 64 and torch_result["decode_runs"] == 4
    assert 0 < torch_result["decode_min_ms"] <= torch_result["decode_ms"] <= torch_result["decode_max_ms"]
    export_onnx(model, "decoder", tmp_path / "kv.onnx", kv_cache=True)
    ort_result = measure_decode(OrtModel(tmp_path / "kv.onnx", "decoder"), 256, context=64, runs=4, warmup=1)
    assert ort_result["decode_ms"] > 0
    export_onnx(model, "decoder", tmp_path / "plain.onnx")
    assert measure_decode(OrtModel(tmp_path / "plain.onnx", "decoder"), 256, context=64, runs=2) == {}  # no cache
