"""Structurally pruned models (per-layer head and neuron counts) export to ONNX at their own shapes."""

from __future__ import annotations

import onnx
import pytest
import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.api import save_hf
from slimformer.errors import UserError
from slimformer.export.onnx import OrtModel, export_onnx, kv_shapes
from slimformer.models.structure import block_parts, keep_heads, keep_neurons


def _pruned_llama() -> torch.nn.Module:
    model = tiny_llama(hidden_size=40, intermediate_size=72, max_position_embeddings=2048)
    parts = block_parts(model)
    keep_heads(parts[0], [0, 1])  # block 0: 2 query heads sharing 1 key/value head
    keep_neurons(parts[1], range(0, 72, 2))  # block 1: 36 of 72 neurons
    return model


def test_non_uniform_model_exports_and_decodes(tmp_path) -> None:
    model = _pruned_llama()
    assert kv_shapes(model) == [(1, 10), (2, 10)]  # per-layer cache heads, read from the model itself
    info = export_onnx(model, "decoder", tmp_path / "pruned.onnx", kv_cache=True)
    shapes = {tuple(t.dims) for t in onnx.load(info["path"]).graph.initializer}
    assert (40, 20) in shapes and (36, 40) in shapes  # block 0 q_proj (transposed), block 1 down_proj
    ort = OrtModel(info["path"])
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        assert (ort(input_ids=ids).logits - full).abs().max().item() < 1e-4
        logits, past = ort.step(ids[:, :9], torch.ones(1, 9, dtype=torch.long), ort.empty_past(1))
        logits, past = ort.step(ids[:, 9:], torch.ones(1, 10, dtype=torch.long), past)
    assert past[0].shape == (1, 1, 10, 10) and past[2].shape == (1, 2, 10, 10)
    assert (torch.from_numpy(logits)[:, -1] - full[:, -1]).abs().max().item() < 1e-4
    with pytest.raises(UserError, match="non-uniform"):  # a Hugging Face config cannot describe it
        save_hf(model, tmp_path / "hf")
